//! Which ingest process reads which stream partition.
//!
//! Every process renews a membership key and the partition leases it holds in the KV bucket
//! [`bus::INGEST_LEASES_BUCKET`], whose entries expire after
//! [`stores::INGEST_LEASE_TTL`] without a renewal. Each aims at its share of an even split
//! among the members ([`share`]): it gives back partitions above it (after the batch in
//! hand is committed) and takes free ones below it, so a process that joins gets work and
//! a dead one's partitions are taken over once its leases expire. A process that stops
//! gracefully gives its partitions back at once.
//!
//! The lease only keeps the work spread: it is not what keeps a partition exactly once.
//! Every commit requires the partition's watermark to be the one its writer last committed
//! (a compare-and-swap on the catalog, see [`crate::Writer`]), so a process that lost its
//! lease without noticing (paused, cut off) fails its next commit instead of writing twice.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use beacon_proto::bus::{self, Partition};
use beacon_proto::stores;
use beacon_warehouse::Warehouse;
use futures::TryStreamExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::{nats, IngestConfig, IngestError, HEALTH_CHECK};

/// How often leases are renewed and the share checked (well inside the TTL).
const TICK: Duration = Duration::from_secs(1);
const MEMBER_PREFIX: &str = "member.";

struct Held {
    revision: u64,
    worker: Option<Worker>,
    /// When a failed worker may start again, and the pause after the next failure.
    retry_at: Instant,
    pause: Duration,
}

struct Worker {
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), IngestError>>,
}

impl Worker {
    /// Asks the worker to stop after the batch in hand and waits for it.
    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Runs this process's share of the partitions until `shutdown` (then stops its workers and
/// gives their leases back) or a bus error.
pub(crate) async fn manage(
    cfg: &IngestConfig,
    wh: Arc<Warehouse>,
    js: jetstream::Context,
    health: &beacon_serve::Health,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), IngestError> {
    let leases = stores::open_kv(&js, bus::INGEST_LEASES_BUCKET)
        .await
        .map_err(nats)?;
    let mut held: BTreeMap<u32, Held> = BTreeMap::new();
    tick_until_stopped(cfg, &wh, &js, &leases, health, &mut held, &mut shutdown).await;
    for (index, h) in std::mem::take(&mut held) {
        if let Some(w) = h.worker {
            w.stop().await;
        }
        let key = partition(cfg, index).lease_key();
        let _ = leases.delete_expect_revision(&key, Some(h.revision)).await;
    }
    let _ = leases.delete(member_key(&cfg.owner)).await;
    metrics::gauge!("beacon_ingest_partitions_held").set(0.0);
    Ok(())
}

/// The partitions the member at `rank` (of `members`, in name order) should hold: an even
/// split, the first `partitions % members` members one more. Every member computes the same
/// split, so the shares add up to the partitions and settle.
fn share(partitions: usize, members: usize, rank: usize) -> usize {
    let members = members.max(1);
    partitions / members + usize::from(rank < partitions % members)
}

/// Renews this process's membership and lists the members, in name order.
async fn membership(leases: &kv::Store, owner: &str) -> Result<Vec<String>, IngestError> {
    leases
        .put(member_key(owner), owner.as_bytes().to_vec().into())
        .await
        .map_err(nats)?;
    let mut members: Vec<String> = leases
        .keys()
        .await
        .map_err(nats)?
        .try_filter(|k| futures::future::ready(k.starts_with(MEMBER_PREFIX)))
        .try_collect()
        .await
        .map_err(nats)?;
    members.sort();
    Ok(members)
}

fn partition(cfg: &IngestConfig, index: u32) -> Partition {
    Partition {
        index,
        count: cfg.partitions,
    }
}

fn member_key(owner: &str) -> String {
    format!("{MEMBER_PREFIX}{owner}")
}

#[allow(clippy::too_many_arguments)]
async fn tick_until_stopped(
    cfg: &IngestConfig,
    wh: &Arc<Warehouse>,
    js: &jetstream::Context,
    leases: &kv::Store,
    health: &beacon_serve::Health,
    held: &mut BTreeMap<u32, Held>,
    shutdown: &mut watch::Receiver<bool>,
) {
    let owner = cfg.owner.as_str();
    loop {
        if *shutdown.borrow() {
            return;
        }
        // The bucket unreachable for a moment (a hub node restarting, a leader moving)
        // changes nothing: the workers go on (their commits stay guarded) and the shares are
        // checked again on the next tick.
        let members = match membership(leases, owner).await {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(error = %e, "partition leases unreadable; keeping the current share");
                None
            }
        };

        // Renew what we hold; notice workers that ended.
        let mut lost = Vec::new();
        for (&index, h) in held.iter_mut() {
            let key = partition(cfg, index).lease_key();
            match leases
                .update(&key, owner.as_bytes().to_vec().into(), h.revision)
                .await
            {
                Ok(revision) => h.revision = revision,
                // Someone else wrote it, or it expired: another process may own it now.
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    tracing::warn!(partition = index, error = %e, "lost the lease of a partition");
                    metrics::counter!("beacon_ingest_leases_lost_total").increment(1);
                    lost.push(index);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(partition = index, error = %e, "could not renew a lease; trying again");
                }
            }
            if h.worker.as_ref().is_some_and(|w| w.task.is_finished()) {
                let Some(w) = h.worker.take() else { continue };
                let outcome = w.task.await;
                let error = match outcome {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(e.to_string()),
                    Err(join) => Some(join.to_string()),
                };
                if let Some(error) = error {
                    tracing::error!(partition = index, %error, "ingest of a partition failed; restarting in {:?}", h.pause);
                    metrics::counter!("beacon_ingest_restarts_total").increment(1);
                    health.set(HEALTH_CHECK, Err(format!("partition {index}: {error}")));
                    h.retry_at = Instant::now() + h.pause;
                    h.pause = (h.pause * 2).min(Duration::from_secs(10));
                }
            }
        }
        for index in lost {
            if let Some(h) = held.remove(&index) {
                // Not awaited: its next commit fails on the watermark if the new owner
                // committed meanwhile, and it must not hold the renewals of the others up.
                if let Some(w) = h.worker {
                    let _ = w.stop.send(true);
                }
            }
        }

        let fair = match &members {
            Some(members) => {
                let rank = members
                    .iter()
                    .position(|m| m == &member_key(owner))
                    .unwrap_or(members.len());
                share(cfg.partitions as usize, members.len().max(rank + 1), rank)
            }
            None => held.len(),
        };
        let member_count = members.as_ref().map_or(0, Vec::len);

        // Give back what is above the fair share (the highest partitions first).
        while held.len() > fair {
            let Some((index, h)) = held.pop_last() else {
                break;
            };
            if let Some(w) = h.worker {
                w.stop().await;
            }
            let key = partition(cfg, index).lease_key();
            let _ = leases.delete_expect_revision(&key, Some(h.revision)).await;
            tracing::info!(
                partition = index,
                fair,
                members = member_count,
                "gave a partition back"
            );
        }

        // Take free partitions up to the fair share. Our own id on a lease (a restart of
        // this process under the same --ingest-id) is taken back without waiting for it to
        // expire.
        for index in 0..cfg.partitions {
            if held.len() >= fair {
                break;
            }
            if held.contains_key(&index) {
                continue;
            }
            let key = partition(cfg, index).lease_key();
            let revision = match leases.create(&key, owner.as_bytes().to_vec().into()).await {
                Ok(revision) => Some(revision),
                Err(_) => match leases.entry(&key).await {
                    Ok(Some(e))
                        if e.operation == kv::Operation::Put
                            && e.value.as_ref() == owner.as_bytes() =>
                    {
                        leases
                            .update(&key, owner.as_bytes().to_vec().into(), e.revision)
                            .await
                            .ok()
                    }
                    _ => None,
                },
            };
            if let Some(revision) = revision {
                tracing::info!(partition = index, of = cfg.partitions, "took a partition");
                held.insert(
                    index,
                    Held {
                        revision,
                        worker: None,
                        retry_at: Instant::now(),
                        pause: Duration::from_millis(200),
                    },
                );
            }
        }

        // (Re)start the workers of held partitions.
        let now = Instant::now();
        for (&index, h) in held.iter_mut() {
            if h.worker.is_some() || now < h.retry_at {
                continue;
            }
            let (stop, stop_rx) = watch::channel(false);
            let task = tokio::spawn(crate::run_partition(
                cfg.clone(),
                wh.clone(),
                js.clone(),
                (partition(cfg, index), h.revision),
                health.clone(),
                stop_rx,
            ));
            h.worker = Some(Worker { stop, task });
        }
        metrics::gauge!("beacon_ingest_partitions_held").set(held.len() as f64);
        // A worker that kept running for a while starts its next failure's pause afresh.
        for h in held.values_mut() {
            if h.worker.is_some() && now > h.retry_at + Duration::from_secs(60) {
                h.pause = Duration::from_millis(200);
            }
        }

        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = shutdown.changed() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::share;

    #[test]
    fn shares_add_up_to_the_partitions() {
        for partitions in 1..20 {
            for members in 1..8 {
                let shares: Vec<usize> = (0..members)
                    .map(|r| share(partitions, members, r))
                    .collect();
                assert_eq!(shares.iter().sum::<usize>(), partitions);
                let (lo, hi) = (shares.iter().min(), shares.iter().max());
                assert!(hi.zip(lo).is_some_and(|(h, l)| h - l <= 1), "{shares:?}");
            }
        }
        assert_eq!(share(4, 3, 0), 2);
        assert_eq!(share(4, 3, 2), 1);
    }
}
