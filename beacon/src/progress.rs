//! Progress of long CLI work (demo traffic, re-processing): a bar with rate and ETA when
//! stderr is a terminal, otherwise a plain line every few seconds (logs and CI keep a record
//! without control characters).

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often a plain line is written when stderr is not a terminal.
const LINE_EVERY: Duration = Duration::from_secs(5);

pub struct Progress {
    bar: ProgressBar,
    lines: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    /// Progress over `total` `unit`s (0: not known yet, see [`Progress::set_total`]).
    /// Must be called inside a Tokio runtime (the plain lines are written by a task).
    pub fn new(what: &str, unit: &str, total: u64) -> Self {
        let terminal = std::io::stderr().is_terminal();
        let bar = ProgressBar::with_draw_target(
            Some(total),
            if terminal {
                ProgressDrawTarget::stderr()
            } else {
                ProgressDrawTarget::hidden()
            },
        );
        let template = format!(
            "{what} [{{bar:30}}] {{human_pos}}/{{human_len}} {unit} {{per_sec}} ETA {{eta}}"
        );
        if let Ok(style) = ProgressStyle::with_template(&template) {
            bar.set_style(style.progress_chars("=> "));
        }
        let lines = (!terminal).then(|| {
            let (bar, what, unit) = (bar.clone(), what.to_string(), unit.to_string());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(LINE_EVERY);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    eprintln!("{}", line(&bar, &what, &unit));
                }
            })
        });
        Self { bar, lines }
    }

    /// The bar, for work that reports through it (cheap to clone).
    pub fn bar(&self) -> &ProgressBar {
        &self.bar
    }

    pub fn set_total(&self, total: u64) {
        self.bar.set_length(total);
    }

    pub fn set(&self, done: u64) {
        self.bar.set_position(done);
    }

    pub fn finish(self) {
        // Drop does the work.
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(task) = self.lines.take() {
            task.abort();
        }
        self.bar.finish_and_clear();
    }
}

/// "what: 5,000/20,000 unit (25%), 2,500/s, ETA 6 s".
fn line(bar: &ProgressBar, what: &str, unit: &str) -> String {
    let done = bar.position();
    let total = bar.length().unwrap_or(0);
    let pct = (done * 100)
        .checked_div(total)
        .map(|p| format!(" ({p}%)"))
        .unwrap_or_default();
    format!(
        "{what}: {done}/{total} {unit}{pct}, {:.0}/s, ETA {} s",
        bar.per_sec(),
        bar.eta().as_secs()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn plain_lines_say_how_far_how_fast_and_how_long() {
        let p = Progress::new("sending", "events", 200);
        p.set(50);
        let text = line(p.bar(), "sending", "events");
        assert!(text.starts_with("sending: 50/200 events (25%), "), "{text}");
        assert!(text.contains("ETA "), "{text}");
    }
}
