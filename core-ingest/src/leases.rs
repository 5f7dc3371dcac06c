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

use crate::{nats, pause_unless_stopped, Backoff, IngestConfig, IngestError, HEALTH_CHECK};

/// How often leases are renewed and the share checked (well inside the TTL).
const TICK: Duration = Duration::from_secs(1);
const MEMBER_PREFIX: &str = "member.";

struct Held {
    revision: u64,
    worker: Worker,
}

/// A partition's worker: it runs the partition, restarting it after failures with a pause
/// of its own, until stopped. (Not restarted from the lease loop: renewals that are slow
/// while the bus recovers must not hold a restart up.)
struct Worker {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
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
        h.worker.stop().await;
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

/// Runs `partition` until `stop`, starting it over after a failure (a bus or storage error,
/// or another writer's commit) after a pause that grows to 10 s and starts afresh once a
/// run has lasted a minute. Every start reads through a consumer of its own generation
/// (the lease revision, then the attempt), so nothing of a failed start is reused.
async fn supervise(
    cfg: IngestConfig,
    (wh, js): (Arc<Warehouse>, jetstream::Context),
    (partition, revision): (Partition, u64),
    health: beacon_serve::Health,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::default();
    for attempt in 0u64.. {
        let started = Instant::now();
        let generation = (revision << 16) | (attempt & 0xffff);
        let run = crate::run_partition(
            cfg.clone(),
            wh.clone(),
            js.clone(),
            (partition, generation),
            health.clone(),
            stop.clone(),
        );
        let Err(e) = run.await else {
            return; // stopped
        };
        let index = partition.index;
        tracing::error!(partition = index, error = %e, "ingest of a partition failed; restarting in {:?}", backoff.pause);
        metrics::counter!("beacon_ingest_restarts_total").increment(1);
        health.set(HEALTH_CHECK, Err(format!("partition {index}: {e}")));
        if !backoff.wait(started, &mut stop).await {
            return;
        }
    }
}

enum Lease {
    /// Held by us, renewed at this revision.
    Ours(u64),
    /// Someone else's, or nobody's (expired).
    NotOurs,
    /// The bucket did not answer.
    Unknown,
}

/// Whether lease `key` holds `owner`; if so it is renewed.
async fn ours(leases: &kv::Store, key: &str, owner: &str) -> Lease {
    match leases.entry(key).await {
        Ok(Some(e))
            if e.operation == kv::Operation::Put && e.value.as_ref() == owner.as_bytes() =>
        {
            match leases
                .update(key, owner.as_bytes().to_vec().into(), e.revision)
                .await
            {
                Ok(revision) => Lease::Ours(revision),
                Err(_) => Lease::Unknown,
            }
        }
        Ok(_) => Lease::NotOurs,
        Err(_) => Lease::Unknown,
    }
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
                // Someone else wrote it or it expired (another process may own it now); or
                // our last renewal landed but its answer was lost (a leader change).
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    match ours(leases, &key, owner).await {
                        Lease::Ours(revision) => {
                            h.revision = revision;
                            continue;
                        }
                        // Cannot tell now: keep it, ask again on the next tick.
                        Lease::Unknown => continue,
                        Lease::NotOurs => {}
                    }
                    tracing::warn!(partition = index, error = %e, "lost the lease of a partition");
                    metrics::counter!("beacon_ingest_leases_lost_total").increment(1);
                    lost.push(index);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(partition = index, error = %e, "could not renew a lease; trying again");
                }
            }
        }
        for index in lost {
            if let Some(h) = held.remove(&index) {
                // Not awaited: its next commit fails on the watermark if the new owner
                // committed meanwhile, and it must not hold the renewals of the others up.
                let _ = h.worker.stop.send(true);
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
            h.worker.stop().await;
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
                Err(_) => match ours(leases, &key, owner).await {
                    Lease::Ours(revision) => Some(revision),
                    Lease::NotOurs | Lease::Unknown => None,
                },
            };
            if let Some(revision) = revision {
                tracing::info!(partition = index, of = cfg.partitions, "took a partition");
                let (stop, stop_rx) = watch::channel(false);
                let task = tokio::spawn(supervise(
                    cfg.clone(),
                    (wh.clone(), js.clone()),
                    (partition(cfg, index), revision),
                    health.clone(),
                    stop_rx,
                ));
                held.insert(
                    index,
                    Held {
                        revision,
                        worker: Worker { stop, task },
                    },
                );
            }
        }
        metrics::gauge!("beacon_ingest_partitions_held").set(held.len() as f64);

        pause_unless_stopped(TICK, shutdown).await;
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
