//! Atomic replace commits: one Iceberg snapshot that removes some data files and adds others.
//!
//! The `iceberg` crate (0.10) can only fast-append; its snapshot producer and commit types are
//! crate-private. This module writes the same thing per the Iceberg spec from the crate's
//! public spec types, and can be swapped for upstream's `RewriteFiles` when it exists:
//!
//! 1. load the table; if a snapshot in the current ancestry carries this job's id
//!    ([`JOB_PROPERTY`]), the job was already applied: done (idempotent re-runs after a crash);
//! 2. read every data manifest of the current snapshot; every file to remove must be live
//!    (else [`WarehouseError::NotLive`]: someone else rewrote it, the job is stale);
//! 3. manifests without a removed file are carried over untouched; the entries of the others
//!    go into one rewritten manifest, as `existing` (original snapshot id and sequence numbers
//!    kept) or `deleted`; the added files into one new manifest;
//! 4. a v2 manifest list, a snapshot (operation `replace`, `overwrite` or `delete`) whose
//!    summary carries the parent's watermarks forward (`beacon.stream-seq`,
//!    `beacon.events-seq`: without them exactly-once breaks at the next restart), then the new metadata
//!    JSON with that snapshot on `main`;
//! 5. a compare-and-swap on the catalog row, exactly as the SQL catalog commits: `UPDATE ...
//!    WHERE metadata_location = <the one we read>`, which must change exactly one row.
//!
//! On a lost swap (an ingest append or a rollup landed meanwhile) the staged files are deleted
//! and everything is redone from step 1 on the new current snapshot, so concurrent appends are
//! kept. A crash anywhere before the swap leaves only unreferenced files (maintenance deletes
//! orphans); after it, the job id makes a re-run a no-op (as long as the job's snapshot has not
//! been expired: idempotency holds within the snapshot retention).

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

use iceberg::spec::{
    DataContentType, DataFile, DataFileFormat, FormatVersion, ManifestContentType, ManifestFile,
    ManifestListWriter, ManifestWriter, ManifestWriterBuilder, Operation, Snapshot,
    SnapshotSummaryCollector, Summary, MAIN_BRANCH,
};
use iceberg::table::Table;
use iceberg::{Catalog, MetadataLocation, TableIdent};
use sqlx::any::{install_default_drivers, AnyPoolOptions};
use sqlx::AnyPool;

use crate::WarehouseError;

/// Snapshot property naming the job that produced a replace (never carried forward).
pub const JOB_PROPERTY: &str = "beacon.job";
/// How often a replace is re-based after losing the swap before it gives up.
const MAX_ATTEMPTS: u32 = 20;

/// What one replace commit does.
#[derive(Debug, Clone)]
pub struct Rewrite {
    /// `Replace` (same rows, new files: compaction), `Overwrite` (changed rows) or `Delete`.
    pub operation: Operation,
    /// Paths of data files to remove; each must be live in the snapshot the commit is based on.
    pub removed: Vec<String>,
    /// New data files (written to the table's location with its current spec).
    pub added: Vec<DataFile>,
    /// Extra properties of this snapshot (not carried into later ones); a watermark given
    /// here replaces the carried-forward one only if it is higher.
    pub properties: HashMap<String, String>,
    /// Unique per job: a job whose id is already in the table's ancestry is not applied again.
    pub job_id: String,
    /// Also fold every other data manifest into the rewritten one (manifest compaction).
    pub merge_manifests: bool,
    /// Snapshot properties the current snapshot must still carry at every attempt (a job
    /// computed from a watermark must not land over a commit that moved it): else
    /// [`WarehouseError::Stale`].
    pub require: Vec<(String, String)>,
}

impl Rewrite {
    pub fn new(operation: Operation, job_id: impl Into<String>) -> Self {
        Self {
            operation,
            removed: Vec::new(),
            added: Vec::new(),
            properties: HashMap::new(),
            job_id: job_id.into(),
            merge_manifests: false,
            require: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Committed as `snapshot_id` after `attempts` tries (1 = no conflict).
    Committed { snapshot_id: i64, attempts: u32 },
    /// The job id was already in the ancestry, at `snapshot_id`: nothing was written.
    AlreadyApplied { snapshot_id: i64 },
}

/// One table row of the SQL catalog.
#[derive(Debug, Clone)]
pub(crate) struct CatalogRow {
    pub namespace: String,
    pub name: String,
    pub metadata: String,
    pub previous: Option<String>,
}

/// The compare-and-swap on the SQL catalog's table row, as `iceberg-catalog-sql` does it.
pub(crate) struct CatalogSwap {
    pool: AnyPool,
    catalog_name: String,
    /// PostgreSQL takes `$n` placeholders, SQLite `?` (sqlx's Any driver passes them as
    /// written).
    dollar_placeholders: bool,
}

impl CatalogSwap {
    /// `uri` is the catalog database's sqlx URI (`sqlite:...`, `postgres://...`).
    pub(crate) async fn connect(uri: &str, catalog_name: &str) -> Result<Self, WarehouseError> {
        install_default_drivers();
        let pool = AnyPoolOptions::new()
            .max_connections(2)
            .connect(uri)
            .await
            .map_err(WarehouseError::Catalog)?;
        if uri.starts_with("sqlite:") {
            // Write-ahead logging (kept in the file, so every connection to it uses it):
            // readers then never block the commits of several ingest processes, nor they
            // the readers; in the default rollback journal a `beacon sql` opening the
            // catalog under such load failed with "database is locked" after 5 s.
            if let Err(e) = sqlx::query("PRAGMA journal_mode=WAL").execute(&pool).await {
                tracing::warn!(error = %e, "the catalog stays in rollback-journal mode");
            }
        }
        Ok(Self {
            pool,
            catalog_name: catalog_name.to_string(),
            dollar_placeholders: uri.starts_with("postgres"),
        })
    }

    /// `sql` with its `?` placeholders in the catalog database's own style.
    fn sql(&self, sql: &str) -> String {
        if !self.dollar_placeholders {
            return sql.to_string();
        }
        let mut out = String::with_capacity(sql.len() + 8);
        let mut n = 0;
        for c in sql.chars() {
            if c == '?' {
                n += 1;
                out.push_str(&format!("${n}"));
            } else {
                out.push(c);
            }
        }
        out
    }

    /// Every table row of this catalog.
    pub(crate) async fn locations(&self) -> Result<Vec<CatalogRow>, WarehouseError> {
        let rows: Vec<(String, String, String, Option<String>)> = sqlx::query_as(&self.sql(
            "SELECT table_namespace, table_name, metadata_location, previous_metadata_location \
             FROM iceberg_tables WHERE catalog_name = ? ORDER BY table_namespace, table_name",
        ))
        .bind(&self.catalog_name)
        .fetch_all(&self.pool)
        .await
        .map_err(WarehouseError::Catalog)?;
        Ok(rows
            .into_iter()
            .map(|(namespace, name, metadata, previous)| CatalogRow {
                namespace,
                name,
                metadata,
                previous,
            })
            .collect())
    }

    /// Points each row at new (metadata, previous) locations, all in one transaction.
    pub(crate) async fn set_locations(
        &self,
        moves: &[(CatalogRow, String, Option<String>)],
    ) -> Result<(), WarehouseError> {
        let mut tx = self.pool.begin().await.map_err(WarehouseError::Catalog)?;
        for (row, metadata, previous) in moves {
            let done = sqlx::query(&self.sql(
                "UPDATE iceberg_tables SET metadata_location = ?, previous_metadata_location = ? \
                 WHERE catalog_name = ? AND table_namespace = ? AND table_name = ? \
                   AND metadata_location = ?",
            ))
            .bind(metadata)
            .bind(previous.clone())
            .bind(&self.catalog_name)
            .bind(&row.namespace)
            .bind(&row.name)
            .bind(&row.metadata)
            .execute(&mut *tx)
            .await
            .map_err(WarehouseError::Catalog)?;
            if done.rows_affected() != 1 {
                return Err(WarehouseError::CatalogCorrupt(format!(
                    "{}.{} changed while being relocated",
                    row.namespace, row.name
                )));
            }
        }
        tx.commit().await.map_err(WarehouseError::Catalog)
    }

    /// Where the catalog says `ident`'s current metadata is (`None`: no such table).
    pub(crate) async fn metadata_location(
        &self,
        ident: &TableIdent,
    ) -> Result<Option<String>, WarehouseError> {
        let row: Option<(String,)> = sqlx::query_as(&self.sql(
            "SELECT metadata_location FROM iceberg_tables \
             WHERE catalog_name = ? AND table_namespace = ? AND table_name = ?",
        ))
        .bind(&self.catalog_name)
        .bind(ident.namespace().join("."))
        .bind(ident.name())
        .fetch_optional(&self.pool)
        .await
        .map_err(WarehouseError::Catalog)?;
        Ok(row.map(|(l,)| l))
    }

    /// Points `ident` at `new` if it still points at `expected`. `Ok(false)`: someone else
    /// committed first.
    async fn swap(
        &self,
        ident: &TableIdent,
        expected: &str,
        new: &str,
    ) -> Result<bool, WarehouseError> {
        let result = sqlx::query(&self.sql(
            "UPDATE iceberg_tables SET metadata_location = ?, previous_metadata_location = ? \
             WHERE catalog_name = ? AND table_namespace = ? AND table_name = ? \
               AND (iceberg_type = 'TABLE' OR iceberg_type IS NULL) \
               AND metadata_location = ?",
        ))
        .bind(new)
        .bind(expected)
        .bind(&self.catalog_name)
        .bind(ident.namespace().join("."))
        .bind(ident.name())
        .bind(expected)
        .execute(&self.pool)
        .await
        .map_err(WarehouseError::Catalog)?;
        match result.rows_affected() {
            0 => Ok(false),
            1 => Ok(true),
            n => Err(WarehouseError::CatalogCorrupt(format!(
                "swapping {ident} changed {n} catalog rows"
            ))),
        }
    }
}

/// Applies `rewrite` to the table `ident` in one atomic snapshot (see the module docs). Use
/// [`Warehouse::replace`](crate::Warehouse::replace), which pairs the catalog with its swap.
/// `loaded`, a recent load of the table, saves the first attempt a load (a stale one only
/// costs a retry: the swap compares the catalog row it was staged on).
pub(crate) async fn replace(
    catalog: &dyn Catalog,
    swap: &CatalogSwap,
    ident: &TableIdent,
    mut loaded: Option<Table>,
    rewrite: &Rewrite,
) -> Result<Outcome, WarehouseError> {
    for attempt in 1..=MAX_ATTEMPTS {
        let table = match loaded.take() {
            Some(table) => table,
            None => catalog.load_table(ident).await?,
        };
        if let Some(snapshot_id) = applied(&table, &rewrite.job_id) {
            return Ok(Outcome::AlreadyApplied { snapshot_id });
        }
        for (property, expected) in &rewrite.require {
            let found = crate::tables::snapshot_property(&table, property);
            if &found != expected {
                return Err(WarehouseError::Stale {
                    table: ident.to_string(),
                    property: property.clone(),
                    expected: expected.clone(),
                    found,
                });
            }
        }
        let staged = stage(&table, rewrite).await?;
        let current = table.metadata_location_result()?.to_string();
        fault_point("before-swap");
        let lost = lost_answer();
        let answer = match lost {
            None => swap.swap(ident, &current, &staged.metadata_location).await,
            Some(LostAnswer::Unanswered) => Err(lost_answer_error()),
            // The swap runs; its reply never arrives.
            Some(_) => swap
                .swap(ident, &current, &staged.metadata_location)
                .await
                .and(Err(lost_answer_error())),
        };
        let swapped = match answer {
            Ok(swapped) => swapped,
            // No answer (a connection cut, a database going down) is not "not committed":
            // the update may have landed with its reply lost. Ask again; unless the row
            // shows our commit, say the outcome is unknown, so no caller deletes files that
            // a landed commit references (an orphan costs a sweep, a deleted file the rows).
            Err(e) => {
                let reread = match lost {
                    Some(LostAnswer::ReplyLost | LostAnswer::Unanswered) => {
                        Err(lost_answer_error())
                    }
                    _ => swap.metadata_location(ident).await,
                };
                match reread {
                    Ok(Some(now)) if now == staged.metadata_location => true,
                    _ => {
                        return Err(WarehouseError::CommitUnknown {
                            table: ident.to_string(),
                            reason: e.to_string(),
                        })
                    }
                }
            }
        };
        if swapped {
            fault_point("after-swap");
            // (Appends, ingest's and the rollups', are routine: not logged at info.)
            if rewrite.operation != Operation::Append {
                tracing::info!(
                    table = %ident,
                    snapshot = staged.snapshot_id,
                    removed = rewrite.removed.len(),
                    added = rewrite.added.len(),
                    attempt,
                    job = %rewrite.job_id,
                    "replace committed"
                );
            }
            return Ok(Outcome::Committed {
                snapshot_id: staged.snapshot_id,
                attempts: attempt,
            });
        }
        // Lost the race: nothing references what we staged.
        for path in &staged.written {
            let _ = table.file_io().delete(path).await;
        }
        tracing::debug!(table = %ident, attempt, "replace lost the swap; re-basing");
        // Appends commit every second or so: a short, growing pause lets them through.
        tokio::time::sleep(Duration::from_millis(5 * u64::from(attempt))).await;
    }
    Err(WarehouseError::CommitConflict {
        table: ident.to_string(),
        attempts: MAX_ATTEMPTS,
    })
}

/// The snapshot in the current ancestry that `job_id` produced, if any.
pub fn applied(table: &Table, job_id: &str) -> Option<i64> {
    let md = table.metadata();
    let mut next = md.current_snapshot_id();
    while let Some(id) = next {
        let snapshot = md.snapshot_by_id(id)?;
        if snapshot.summary().additional_properties.get(JOB_PROPERTY) == Some(&job_id.to_string()) {
            return Some(id);
        }
        next = snapshot.parent_snapshot_id();
    }
    None
}

/// Test-only crash points (`BEACON_FAULT_REPLACE=before-swap|after-swap`): the process dies
/// as if killed, so the kill -9 tests hit the two moments that matter every time.
fn fault_point(at: &str) {
    if std::env::var("BEACON_FAULT_REPLACE").is_ok_and(|v| v == at) {
        eprintln!("BEACON_FAULT_REPLACE: dying {at}");
        std::process::abort();
    }
}

/// Test-only lost answers from the catalog (`BEACON_FAULT_REPLACE=...`), for the first
/// swap of the process only: `reply-lost` (the swap lands, its reply and the re-read are
/// lost, as when the database goes away mid-commit), `unanswered` (the swap never reaches
/// the catalog, nor does the re-read), `reply-lost-reread` (the reply is lost, the re-read
/// answers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LostAnswer {
    ReplyLost,
    Unanswered,
    ReplyLostReread,
}

fn lost_answer() -> Option<LostAnswer> {
    // Read once: a commit path should not look the environment up on every commit.
    static FAULT: std::sync::OnceLock<Option<LostAnswer>> = std::sync::OnceLock::new();
    static FIRED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let fault =
        (*FAULT.get_or_init(
            || match std::env::var("BEACON_FAULT_REPLACE").ok()?.as_str() {
                "reply-lost" => Some(LostAnswer::ReplyLost),
                "unanswered" => Some(LostAnswer::Unanswered),
                "reply-lost-reread" => Some(LostAnswer::ReplyLostReread),
                _ => None,
            },
        ))?;
    (!FIRED.swap(true, std::sync::atomic::Ordering::SeqCst)).then_some(fault)
}

fn lost_answer_error() -> WarehouseError {
    WarehouseError::Catalog(sqlx::Error::Io(std::io::Error::new(
        std::io::ErrorKind::ConnectionReset,
        "BEACON_FAULT_REPLACE: the catalog's answer was lost",
    )))
}

struct Staged {
    snapshot_id: i64,
    metadata_location: String,
    /// Every file written for this attempt (manifests, manifest list, metadata JSON).
    written: Vec<String>,
}

async fn stage(table: &Table, rewrite: &Rewrite) -> Result<Staged, WarehouseError> {
    let md = table.metadata();
    if md.format_version() != FormatVersion::V2 {
        return Err(WarehouseError::Unsupported(format!(
            "replace commits are written for format v2; {} is {}",
            table.identifier(),
            md.format_version()
        )));
    }
    let file_io = table.file_io();
    let schema = md.current_schema().clone();
    let spec = md.default_partition_spec().clone();
    let base = md.current_snapshot();
    let snapshot_id = unique_snapshot_id(table);
    let seq = md.next_sequence_number();
    let commit_id = uuid::Uuid::now_v7();
    let metadata_dir = format!("{}/metadata", md.location());
    let mut written = Vec::new();

    let removed: HashSet<&str> = rewrite.removed.iter().map(String::as_str).collect();
    let mut found: HashSet<String> = HashSet::new();
    let mut summary = SnapshotSummaryCollector::default();
    let mut totals = Totals::default();
    let mut carried: Vec<ManifestFile> = Vec::new();
    let mut rewritten = None;
    let mut rewritten_entries = 0usize;

    // Only adding files (a rollup delta): the parent's manifests are carried without reading
    // them, and the totals continue the parent's.
    let parent_totals = base.and_then(|b| Totals::from_summary(b.summary()));
    let append_only = rewrite.removed.is_empty() && !rewrite.merge_manifests;
    let append_only = append_only && (base.is_none() || parent_totals.is_some());
    if let (true, Some(t)) = (append_only, parent_totals) {
        totals = t;
    }
    if let Some(base) = base {
        let list = table.manifest_list_reader(base).load().await?;
        // (`consume_entries` is not `Send`: copy the list out.)
        for manifest in list.entries().to_vec() {
            if manifest.content != ManifestContentType::Data || append_only {
                // Beacon writes no delete files; another engine's are kept as they are.
                carried.push(manifest);
                continue;
            }
            let loaded = manifest.load_manifest(file_io).await?;
            let live: Vec<_> = loaded.entries().iter().filter(|e| e.is_alive()).collect();
            let touched = live.iter().any(|e| removed.contains(e.file_path()));
            if !touched && !rewrite.merge_manifests {
                for e in &live {
                    totals.add(e.data_file());
                }
                carried.push(manifest);
                continue;
            }
            if manifest.partition_spec_id != spec.spec_id() {
                // Beacon never evolves a partition spec; rewriting across specs is not done.
                return Err(WarehouseError::Unsupported(format!(
                    "{} lists files of partition spec {}, not the current one",
                    manifest.manifest_path, manifest.partition_spec_id
                )));
            }
            let writer = match rewritten.as_mut() {
                Some(w) => w,
                None => {
                    let path = format!("{metadata_dir}/{commit_id}-m0.avro");
                    written.push(path.clone());
                    rewritten.insert(manifest_writer(table, snapshot_id, &path)?)
                }
            };
            for e in live {
                let data_seq = e
                    .sequence_number()
                    .ok_or_else(|| missing_seq(e.file_path()))?;
                let file_seq = e.file_sequence_number;
                if removed.contains(e.file_path()) {
                    found.insert(e.file_path().to_string());
                    summary.remove_file(e.data_file(), schema.clone(), spec.clone());
                    writer.add_delete_file(e.data_file().clone(), data_seq, file_seq)?;
                } else {
                    let added_by = e.snapshot_id().ok_or_else(|| missing_seq(e.file_path()))?;
                    totals.add(e.data_file());
                    writer.add_existing_file(
                        e.data_file().clone(),
                        added_by,
                        data_seq,
                        file_seq,
                    )?;
                }
                rewritten_entries += 1;
            }
        }
    }
    if found.len() != removed.len() {
        let missing = rewrite
            .removed
            .iter()
            .find(|p| !found.contains(*p))
            .cloned()
            .unwrap_or_default();
        return Err(WarehouseError::NotLive {
            table: table.identifier().to_string(),
            path: missing,
        });
    }

    // Added files go into the rewritten manifest when there is one (one manifest after a
    // merge), else into their own.
    let mut writer = match rewritten {
        Some(w) => Some(w),
        None if !rewrite.added.is_empty() => {
            let path = format!("{metadata_dir}/{commit_id}-m1.avro");
            written.push(path.clone());
            Some(manifest_writer(table, snapshot_id, &path)?)
        }
        None => None,
    };
    for file in &rewrite.added {
        // (The crate does not expose a data file's spec id: added files must come from
        // `write_files`, which writes with the current spec.)
        if file.content_type() != DataContentType::Data {
            return Err(WarehouseError::Unsupported(format!(
                "{} is not a data file of {}",
                file.file_path(),
                table.identifier()
            )));
        }
        summary.add_file(file, schema.clone(), spec.clone());
        totals.add(file);
        if let Some(w) = writer.as_mut() {
            w.add_file(file.clone(), seq)?;
            rewritten_entries += 1;
        }
    }
    let mut manifests = carried;
    if let Some(w) = writer {
        if rewritten_entries > 0 {
            manifests.push(w.write_manifest_file().await?);
        }
    }

    let list_path = format!(
        "{metadata_dir}/snap-{snapshot_id}-1-{commit_id}.{}",
        DataFileFormat::Avro
    );
    written.push(list_path.clone());
    let mut list = ManifestListWriter::v2(
        file_io.new_output(&list_path)?.writer().await?,
        snapshot_id,
        md.current_snapshot_id(),
        seq,
    );
    list.add_manifests(manifests.into_iter())?;
    list.close().await?;

    // Properties: the parent's watermarks carried forward, then the caller's (for this
    // snapshot only), then this job's id, then the computed counts (which nobody may shadow).
    let mut properties = crate::tables::watermarks(base);
    for (k, v) in &rewrite.properties {
        // A watermark only moves forward: a job's own never lowers a newer commit's.
        let keep = match (properties.get(k), v.parse::<u64>()) {
            (Some(have), Ok(new)) if crate::tables::is_watermark(k) => {
                have.parse::<u64>().is_ok_and(|have| have > new)
            }
            _ => false,
        };
        if !keep {
            properties.insert(k.clone(), v.clone());
        }
    }
    properties.insert(JOB_PROPERTY.into(), rewrite.job_id.clone());
    properties.extend(summary.build());
    properties.extend(totals.properties());

    let now = chrono_now_ms().max(md.last_updated_ms() + 1);
    let snapshot = Snapshot::builder()
        .with_manifest_list(list_path)
        .with_snapshot_id(snapshot_id)
        .with_parent_snapshot_id(md.current_snapshot_id())
        .with_sequence_number(seq)
        .with_summary(Summary {
            operation: rewrite.operation.clone(),
            additional_properties: properties,
        })
        .with_schema_id(md.current_schema_id())
        .with_timestamp_ms(now)
        .build();
    let current = table.metadata_location_result()?.to_string();
    let new_metadata = md
        .clone()
        .into_builder(Some(current.clone()))
        .set_branch_snapshot(snapshot, MAIN_BRANCH)?
        .build()?
        .metadata;
    let location = MetadataLocation::from_str(&current)?
        .with_next_version()
        .with_new_metadata(&new_metadata);
    new_metadata.write_to(file_io, &location).await?;
    let metadata_location = location.to_string();
    written.push(metadata_location.clone());
    Ok(Staged {
        snapshot_id,
        metadata_location,
        written,
    })
}

/// A v2 data-manifest writer for `snapshot_id` at `path`, in the table's current schema and
/// partition spec.
fn manifest_writer(
    table: &Table,
    snapshot_id: i64,
    path: &str,
) -> Result<ManifestWriter, WarehouseError> {
    let md = table.metadata();
    Ok(ManifestWriterBuilder::new(
        table.file_io().new_output(path)?,
        Some(snapshot_id),
        md.current_schema().clone(),
        md.default_partition_spec().as_ref().clone(),
    )
    .build_v2_data())
}

/// `total-*` summary fields, counted from the live files of the new snapshot.
#[derive(Default, Clone, Copy)]
struct Totals {
    records: u64,
    files: u64,
    bytes: u64,
}

impl Totals {
    /// A snapshot's `total-*` fields, if it has them all.
    fn from_summary(summary: &Summary) -> Option<Self> {
        let get = |k: &str| summary.additional_properties.get(k)?.parse::<u64>().ok();
        Some(Self {
            records: get("total-records")?,
            files: get("total-data-files")?,
            bytes: get("total-files-size")?,
        })
    }

    fn add(&mut self, file: &DataFile) {
        self.records += file.record_count();
        self.files += 1;
        self.bytes += file.file_size_in_bytes();
    }

    fn properties(&self) -> [(String, String); 6] {
        [
            ("total-records".into(), self.records.to_string()),
            ("total-data-files".into(), self.files.to_string()),
            ("total-files-size".into(), self.bytes.to_string()),
            ("total-delete-files".into(), "0".into()),
            ("total-position-deletes".into(), "0".into()),
            ("total-equality-deletes".into(), "0".into()),
        ]
    }
}

fn missing_seq(path: &str) -> WarehouseError {
    WarehouseError::CatalogCorrupt(format!(
        "manifest entry for {path} has no sequence number or snapshot id after inheritance"
    ))
}

fn unique_snapshot_id(table: &Table) -> i64 {
    loop {
        let (a, b) = uuid::Uuid::new_v4().as_u64_pair();
        let id = ((a ^ b) & (i64::MAX as u64)) as i64;
        if id != 0 && table.metadata().snapshot_by_id(id).is_none() {
            return id;
        }
    }
}

fn chrono_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use arrow::array::{ArrayRef, Int64Array, StringArray, TimestampMicrosecondArray};
    use arrow::datatypes::DataType;
    use arrow::record_batch::RecordBatch;

    use super::*;
    use crate::{TableKind, Warehouse};

    /// `n` `failed_events` rows with ids `prefix-i`.
    pub(crate) async fn rows(wh: &Warehouse, prefix: &str, n: usize) -> RecordBatch {
        let schema =
            crate::tables::arrow_schema(&wh.table(TableKind::FailedEvents).await.unwrap()).unwrap();
        let columns = schema
            .fields()
            .iter()
            .map(|f| -> ArrayRef {
                match f.data_type() {
                    DataType::Utf8 => Arc::new(StringArray::from_iter_values(
                        (0..n).map(|i| format!("{prefix}-{i}")),
                    )),
                    DataType::Int64 => Arc::new(Int64Array::from_iter_values(0..n as i64)),
                    DataType::Timestamp(_, tz) => Arc::new(
                        TimestampMicrosecondArray::from_iter_values(
                            (0..n).map(|_| 1_793_577_600_000_000),
                        )
                        .with_timezone_opt(tz.clone()),
                    ),
                    t => arrow::array::new_null_array(t, n),
                }
            })
            .collect();
        RecordBatch::try_new(schema, columns).unwrap()
    }

    /// The swap notices a commit that landed after the replace was staged, and the retry
    /// re-bases on it: the append is kept, the replaced file is gone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_swap_over_a_newer_commit_fails_and_the_retry_keeps_that_commit() {
        let dir = tempfile::tempdir().unwrap();
        let wh = Warehouse::open(dir.path()).await.unwrap();
        let kind = TableKind::FailedEvents;
        wh.append(kind, rows(&wh, "a", 3).await, Default::default())
            .await
            .unwrap();
        let base = wh.table(kind).await.unwrap();
        let old_file = {
            let list = base
                .manifest_list_reader(base.metadata().current_snapshot().unwrap())
                .load()
                .await
                .unwrap();
            let manifest = list.entries()[0]
                .load_manifest(base.file_io())
                .await
                .unwrap();
            manifest.entries()[0].file_path().to_string()
        };
        let mut rewrite = Rewrite::new(Operation::Delete, "delete-a");
        rewrite.removed = vec![old_file];
        let staged = stage(&base, &rewrite).await.unwrap();

        // Ingest commits meanwhile.
        wh.append(kind, rows(&wh, "b", 2).await, Default::default())
            .await
            .unwrap();
        let swapped = wh
            .swap
            .swap(
                &kind.ident(),
                base.metadata_location().unwrap(),
                &staged.metadata_location,
            )
            .await
            .unwrap();
        assert!(!swapped, "the swap must see the newer commit");

        // The whole replace re-bases on the append: b's rows stay, a's go.
        assert!(matches!(
            wh.replace(kind, &rewrite).await.unwrap(),
            Outcome::Committed { .. }
        ));
        let batches = wh
            .session()
            .await
            .unwrap()
            .sql("SELECT event_id FROM failed_events ORDER BY event_id")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let ids: Vec<String> = batches
            .iter()
            .flat_map(|b| {
                let col = arrow::compute::cast(b.column(0), &DataType::Utf8).unwrap();
                let col = col.as_any().downcast_ref::<StringArray>().unwrap().clone();
                col.iter().flatten().map(str::to_string).collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(ids, ["b-0", "b-1"]);
    }
}
