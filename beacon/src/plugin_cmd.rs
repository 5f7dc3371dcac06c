//! `beacon plugin ...`: the plugin registry and pipelines from the command line. The same
//! operations are served over HTTP by the admin API (`beacon_control::admin`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use beacon_control::pipelines::{Activation, Change, PluginSpec};
use beacon_control::Control;
use beacon_proto::bus::{OnFailure, Pipeline};
use clap::Subcommand;

use crate::{Format, NatsTarget, SandboxArgs};

#[derive(Subcommand)]
pub enum PluginCommand {
    /// Run a component locally, in the same sandbox as the edge, over events in a JSONL file
    /// (one canonical event per line); prints the output events as JSONL.
    Test {
        file: PathBuf,
        #[arg(long)]
        events: PathBuf,
        #[arg(long, default_value = "")]
        plugin_config: String,
        #[command(flatten)]
        sandbox: SandboxArgs,
    },
    /// Validate a component (world, imports, size, a smoke run on sample events) and store it
    /// under its sha256. Uploading the same bytes again changes nothing.
    Upload {
        file: PathBuf,
        #[arg(long)]
        name: String,
        /// Config for the smoke run.
        #[arg(long, default_value = "")]
        plugin_config: String,
        /// JSONL of canonical events for the smoke run (default: built-in samples).
        #[arg(long)]
        sample: Option<PathBuf>,
        #[command(flatten)]
        target: NatsTarget,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Uploaded components.
    List {
        #[command(flatten)]
        target: NatsTarget,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Make a new pipeline version (ordered plugins with configs) active, or a canary.
    Activate {
        #[arg(long)]
        merchant: String,
        /// `NAME`, `NAME@SHA256-PREFIX` or a sha256 prefix; repeat in processing order. None:
        /// a pipeline version that processes nothing.
        #[arg(long = "plugin", value_name = "REF")]
        plugins: Vec<String>,
        /// `NAME=CONFIG` for the plugin named NAME (JSON by convention); repeatable.
        #[arg(long = "plugin-config", value_name = "NAME=CONFIG")]
        configs: Vec<String>,
        /// What a failing batch does: `hold` (kept out of `events` until re-processed) or
        /// `pass-through` (stored unprocessed). Always kept in `failed_events`.
        #[arg(long, default_value = "hold")]
        on_failure: OnFailure,
        /// Run it for this share of visitors only, beside the active version.
        #[arg(long, value_name = "PERCENT")]
        canary: Option<u8>,
        #[arg(long, default_value = "")]
        reason: String,
        /// Skip the check run over sample events (the plugins are still validated).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        wait: Wait,
        #[command(flatten)]
        target: NatsTarget,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Make the canary version active for all traffic.
    Promote {
        #[arg(long)]
        merchant: String,
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        wait: Wait,
        #[command(flatten)]
        target: NatsTarget,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Re-activate an earlier version (default: the one active before the current one).
    Rollback {
        #[arg(long)]
        merchant: String,
        #[arg(long, value_name = "VERSION")]
        to: Option<u64>,
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        wait: Wait,
        #[command(flatten)]
        target: NatsTarget,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Every change of a merchant's pipeline: when, who, why, what.
    History {
        #[arg(long)]
        merchant: String,
        #[command(flatten)]
        target: NatsTarget,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Upload a component and make it the merchant's only plugin (upload + activate).
    Attach {
        #[arg(long)]
        merchant: String,
        #[arg(long)]
        name: String,
        file: PathBuf,
        /// The plugin's configuration string (JSON by convention).
        #[arg(long, default_value = "")]
        plugin_config: String,
        /// Skip the check run over sample events (the plugin is still validated).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        wait: Wait,
        #[command(flatten)]
        target: NatsTarget,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
}

#[derive(clap::Args, Clone, Copy)]
pub struct Wait {
    /// Seconds to wait for every live edge to run the change (0: don't wait).
    #[arg(long = "wait", default_value_t = 10)]
    secs: u64,
}

/// A control plane validating with the sandbox limits configured for this machine
/// (`BEACON_PLUGIN_*`, as the edges are) and the shared compiled-plugin cache of the data dir.
pub async fn control(target: &NatsTarget) -> Result<Control> {
    #[derive(clap::Parser)]
    struct FromEnv {
        #[command(flatten)]
        sandbox: SandboxArgs,
    }
    let limits = <FromEnv as clap::Parser>::try_parse_from(["beacon"])?
        .sandbox
        .limits();
    control_with(target, limits).await
}

/// A control plane validating with `limits`.
pub async fn control_with(
    target: &NatsTarget,
    limits: beacon_plugins::SandboxLimits,
) -> Result<Control> {
    let js = target.jetstream().await?;
    let cache = target.data_dir.join("plugin-cache");
    let runtime = Arc::new(beacon_plugins::Runtime::new(
        limits,
        std::fs::create_dir_all(&cache).ok().map(|_| cache),
    )?);
    Ok(Control::open(js, runtime).await?)
}

pub async fn run(command: PluginCommand) -> Result<()> {
    match command {
        PluginCommand::Test {
            file,
            events,
            plugin_config,
            sandbox,
        } => {
            // wasmtime-wasi's stdio blocks on the runtime it finds: run the plugin off the
            // async workers (as the edge does), or a guest writing to stderr would panic here.
            let limits = sandbox.limits();
            tokio::task::spawn_blocking(move || test(&file, &events, &plugin_config, limits))
                .await?
        }
        PluginCommand::Upload {
            file,
            name,
            plugin_config,
            sample,
            target,
            format,
        } => {
            let c = control(&target).await?;
            let bytes = read(&file)?;
            let sample = sample.as_deref().map(read_jsonl).transpose()?;
            let up = c
                .upload(&name, bytes, &plugin_config, sample, &crate::whoami())
                .await?;
            match format {
                Format::Table => {
                    println!(
                        "{} {}@{} ({} bytes, contract {}); smoke run: {} events in, {} out{}",
                        if up.created {
                            "stored"
                        } else {
                            "already stored"
                        },
                        up.plugin.name,
                        up.plugin.sha256,
                        up.plugin.size,
                        up.plugin.contract,
                        up.smoke_in,
                        up.smoke_out,
                        up.smoke_error
                            .as_deref()
                            .map(|e| format!(" (plugin refused the sample: {e})"))
                            .unwrap_or_default()
                    )
                }
                _ => println!("{}", serde_json::to_string(&up)?),
            }
            Ok(())
        }
        PluginCommand::List { target, format } => {
            let c = control(&target).await?;
            let all = c.list_plugins().await?;
            match format {
                Format::Table => {
                    println!(
                        "{:<20} {:<16} {:>9} {:<8} uploaded by",
                        "name", "sha256", "bytes", "contract"
                    );
                    for p in all {
                        println!(
                            "{:<20} {:<16} {:>9} {:<8} {} at {}",
                            p.name,
                            p.sha256.get(..16).unwrap_or(&p.sha256),
                            p.size,
                            p.contract,
                            p.uploaded_by,
                            p.uploaded_at
                        );
                    }
                }
                _ => println!("{}", serde_json::to_string(&all)?),
            }
            Ok(())
        }
        PluginCommand::Activate {
            merchant,
            plugins,
            configs,
            on_failure,
            canary,
            reason,
            force,
            wait,
            target,
            format,
        } => {
            let c = control(&target).await?;
            let activation = Activation {
                plugins: specs(&plugins, &configs)?,
                on_failure,
                canary_percent: canary,
                reason,
                force,
            };
            let change = c.activate(&merchant, &activation, &crate::whoami()).await?;
            report(&c, change, wait, format).await
        }
        PluginCommand::Promote {
            merchant,
            reason,
            wait,
            target,
            format,
        } => {
            let c = control(&target).await?;
            let change = c.promote(&merchant, &crate::whoami(), &reason).await?;
            report(&c, change, wait, format).await
        }
        PluginCommand::Rollback {
            merchant,
            to,
            reason,
            wait,
            target,
            format,
        } => {
            let c = control(&target).await?;
            let change = c.rollback(&merchant, to, &crate::whoami(), &reason).await?;
            report(&c, change, wait, format).await
        }
        PluginCommand::History {
            merchant,
            target,
            format,
        } => {
            let c = control(&target).await?;
            let history = c.history(&merchant).await?;
            match format {
                Format::Table => {
                    for h in history {
                        match h.pipeline {
                            Some(p) => println!(
                                "rev {:<4} {} by {:<10} {}  \"{}\"",
                                h.revision,
                                p.changed_at,
                                p.changed_by,
                                describe(&p),
                                p.reason
                            ),
                            None => println!("rev {:<4} removed", h.revision),
                        }
                    }
                }
                _ => println!("{}", serde_json::to_string(&history)?),
            }
            Ok(())
        }
        PluginCommand::Attach {
            merchant,
            name,
            file,
            plugin_config,
            force,
            wait,
            target,
            format,
        } => {
            let c = control(&target).await?;
            let change = c
                .attach(
                    &merchant,
                    &name,
                    read(&file)?,
                    &plugin_config,
                    force,
                    &crate::whoami(),
                )
                .await?;
            report(&c, change, wait, format).await
        }
    }
}

/// One line: `v3 [utm@ab12cd34ef56, goals@...] on failure hold; canary v4 at 10%`.
pub fn describe(p: &Pipeline) -> String {
    let def = |d: &beacon_proto::bus::PipelineDef| {
        let plugins: Vec<String> = d
            .plugins
            .iter()
            .map(|p| format!("{}@{}", p.name, beacon_control::short_sha(&p.sha256)))
            .collect();
        format!("v{} [{}]", d.version, plugins.join(", "))
    };
    let mut s = format!("{} on failure {:?}", def(&p.active), p.active.on_failure);
    if let Some(c) = &p.canary {
        s.push_str(&format!("; canary {} at {}%", def(&c.def), c.percent));
    }
    s
}

async fn report(c: &Control, change: Change, wait: Wait, format: Format) -> Result<()> {
    let merchant = change.pipeline.merchant_id.clone();
    let applied = if wait.secs > 0 {
        let (edges, took) = beacon_control::edges::wait_applied(
            c.jetstream(),
            &merchant,
            change.revision,
            Duration::from_secs(wait.secs),
        )
        .await?;
        Some((edges, took.as_millis() as u64))
    } else {
        None
    };
    match format {
        Format::Table => {
            println!(
                "merchant {merchant} pipeline {}",
                describe(&change.pipeline)
            );
            if let Some((edges, ms)) = applied {
                println!("active on {edges} live edge(s) after {ms} ms");
            }
        }
        _ => println!(
            "{}",
            serde_json::json!({
                "pipeline": change.pipeline,
                "revision": change.revision,
                "edges": applied.map(|a| a.0),
                "applied_ms": applied.map(|a| a.1),
            })
        ),
    }
    Ok(())
}

fn specs(plugins: &[String], configs: &[String]) -> Result<Vec<PluginSpec>> {
    let mut out: Vec<PluginSpec> = plugins
        .iter()
        .map(|p| PluginSpec {
            plugin: p.clone(),
            config: serde_json::Value::Null,
        })
        .collect();
    for c in configs {
        let (name, config) = c
            .split_once('=')
            .ok_or_else(|| anyhow!("--plugin-config takes NAME=CONFIG, not `{c}`"))?;
        let spec = out
            .iter_mut()
            .find(|s| s.plugin.split('@').next() == Some(name))
            .ok_or_else(|| anyhow!("--plugin-config {name}=...: no --plugin named {name}"))?;
        spec.config = serde_json::Value::String(config.to_string());
    }
    Ok(out)
}

fn read(file: &Path) -> Result<Vec<u8>> {
    std::fs::read(file).with_context(|| format!("reading {}", file.display()))
}

fn read_jsonl(path: &Path) -> Result<Vec<beacon_proto::Event>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str::<beacon_proto::Event>(l)
                .with_context(|| format!("{}:{}: not a canonical event", path.display(), i + 1))
        })
        .collect()
}

fn test(
    file: &Path,
    events: &Path,
    config: &str,
    limits: beacon_plugins::SandboxLimits,
) -> Result<()> {
    let bytes = read(file)?;
    let input = read_jsonl(events)?;
    let runtime = beacon_plugins::Runtime::new(limits, None)?;
    let plugin = runtime.load(&beacon_plugins::Runtime::sha256(&bytes), &bytes)?;
    let started = std::time::Instant::now();
    let (output, log) = plugin.process_with_log(config, &input);
    if !log.is_empty() {
        eprintln!(
            "--- plugin output (stdout/stderr) ---\n{}",
            String::from_utf8_lossy(&log)
        );
    }
    let output = output?;
    for e in &output {
        println!("{}", serde_json::to_string(e)?);
    }
    // As the edge would: plugin output must be as valid as client input.
    beacon_control::registry::validate_output(&output).map_err(|e| anyhow!(e))?;
    eprintln!(
        "{} events in, {} out, {:.2} ms (sha256 {}, contract {})",
        input.len(),
        output.len(),
        started.elapsed().as_secs_f64() * 1000.0,
        plugin.sha256(),
        plugin.contract()
    );
    Ok(())
}
