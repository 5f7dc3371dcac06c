//! Ingest throughput into Iceberg: core-ingest's writer (envelopes as they come off the bus,
//! packed -> `raw_events` and `events`, sorted, partitioned, zstd Parquet, one commit per table
//! with its watermark) against the bare `iceberg` writer appending the same rows, already as
//! Arrow batches (partition split, library-default Parquet settings, fast append, one table
//! after the other): what the library alone can do. Both in the same run, on fresh warehouses.
//!
//!     cargo bench -p beacon --bench ingest                       # 1M events, 100 envelopes of 500 per commit
//!     BEACON_BENCH_EVENTS=200000 cargo bench -p beacon --bench ingest
//!
//! Rows count both tables (one event = two rows). Prints a Markdown report.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::record_batch::RecordBatch;
use beacon::traffic::{self, TrafficConfig};
use beacon_ingest::convert::{events_batch, Received};
use beacon_ingest::dedupe::{self, Dedupe};
use beacon_warehouse::tables::arrow_schema;
use beacon_warehouse::{TableKind, Warehouse};
use common::env_usize;
use iceberg::arrow::RecordBatchPartitionSplitter;
use iceberg::spec::DataFileFormat;
use iceberg::transaction::{ApplyTransactionAction, Transaction};
use iceberg::writer::base_writer::data_file_writer::DataFileWriterBuilder;
use iceberg::writer::file_writer::location_generator::{
    DefaultFileNameGenerator, DefaultLocationGenerator,
};
use iceberg::writer::file_writer::rolling_writer::RollingFileWriterBuilder;
use iceberg::writer::file_writer::ParquetWriterBuilder;
use iceberg::writer::partitioning::fanout_writer::FanoutWriter;
use iceberg::writer::partitioning::PartitioningWriter;
use parquet::file::properties::WriterProperties;

/// Decodes `chunk` as core-ingest does, numbering it from stream sequence `first + 1`.
fn decode(first: usize, chunk: &[Vec<u8>]) -> Vec<Received> {
    chunk
        .iter()
        .enumerate()
        .map(|(i, p)| beacon_ingest::decode((first + i + 1) as u64, p))
        .collect()
}

/// Core-ingest's path, timed from the envelope bytes to the last commit, with per-event
/// deduplication over `window` (zero: off).
async fn beacon_path(payloads: &[Vec<u8>], per_commit: usize, window: Duration) -> (f64, usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let wh = Arc::new(Warehouse::open(dir.path()).await.expect("warehouse"));
    let mut writer = beacon_ingest::Writer::open(wh.clone(), beacon_proto::bus::Partition::WHOLE)
        .await
        .expect("writer");
    writer.dedupe = Dedupe::new(window);
    let started = Instant::now();
    let mut rows = 0;
    for (c, chunk) in payloads.chunks(per_commit).enumerate() {
        let received = decode(c * per_commit, chunk);
        rows += writer.commit(received).await.expect("commit").0;
    }
    (started.elapsed().as_secs_f64(), rows)
}

/// The bare library: the same rows as Arrow batches (built before the clock starts).
async fn bare_path(payloads: &[Vec<u8>], per_commit: usize) -> (f64, usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let wh = Warehouse::open(dir.path()).await.expect("warehouse");
    let mut commits: Vec<Vec<(TableKind, RecordBatch)>> = Vec::new();
    for (c, chunk) in payloads.chunks(per_commit).enumerate() {
        let received = decode(c * per_commit, chunk);
        let refs: Vec<&Received> = received.iter().collect();
        let mut tables = Vec::new();
        for (kind, processed) in [(TableKind::RawEvents, false), (TableKind::Events, true)] {
            let schema = arrow_schema(&wh.table(kind).await.expect("table")).expect("schema");
            tables.push((
                kind,
                events_batch(&schema, &refs, processed).expect("batch"),
            ));
        }
        commits.push(tables);
    }
    let started = Instant::now();
    let mut rows = 0;
    for tables in commits {
        for (kind, batch) in tables {
            rows += batch.num_rows();
            let table = wh.table(kind).await.expect("table");
            let md = table.metadata();
            let schema = md.current_schema().clone();
            let parquet = ParquetWriterBuilder::new(WriterProperties::default(), schema.clone());
            let rolling = RollingFileWriterBuilder::new(
                parquet,
                128 << 20,
                table.file_io().clone(),
                DefaultLocationGenerator::new(md).expect("locations"),
                DefaultFileNameGenerator::new(
                    uuid::Uuid::now_v7().to_string(),
                    None,
                    DataFileFormat::Parquet,
                ),
            );
            let mut fanout: FanoutWriter<_> =
                FanoutWriter::new(DataFileWriterBuilder::new(rolling));
            let splitter = RecordBatchPartitionSplitter::try_new_with_computed_values(
                schema,
                md.default_partition_spec().clone(),
            )
            .expect("splitter");
            for (key, part) in splitter.split(&batch).expect("split") {
                fanout.write(key, part).await.expect("write");
            }
            let files = fanout.close().await.expect("close");
            let tx = Transaction::new(&table);
            let tx = tx
                .fast_append()
                .with_check_duplicate(false)
                .add_data_files(files)
                .apply(tx)
                .expect("append");
            tx.commit(wh.catalog().as_ref()).await.expect("commit");
        }
    }
    (started.elapsed().as_secs_f64(), rows)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let events_n = env_usize("BEACON_BENCH_EVENTS", 1_000_000);
    let per_envelope = env_usize("BEACON_BENCH_ENVELOPE", 500);
    let per_commit = env_usize("BEACON_BENCH_COMMIT", 100);
    let merchants = env_usize("BEACON_BENCH_MERCHANTS", 1000);
    let sites = traffic::sites(merchants, |i| format!("ing-{i}"));
    let config = TrafficConfig {
        seed: 5,
        events: events_n,
        start_ms: 1_793_577_600_000,
        days: 2,
        zipf_s: 1.0,
        late_share: 0.0,
    };
    // Arrival order: edges batch per merchant, and batches from all merchants interleave.
    let events = traffic::events_in_time_order(&config, &sites);
    let envelopes = traffic::envelopes(events, per_envelope);
    // As edges write them (packed); the JSON of older edges only for the decoding figure.
    let payloads: Vec<Vec<u8>> = envelopes.iter().map(|e| e.to_packed()).collect();
    let json: Vec<Vec<u8>> = envelopes.iter().map(|e| e.to_json()).collect();
    drop(envelopes);
    let mib = |p: &[Vec<u8>]| p.iter().map(Vec::len).sum::<usize>() as f64 / 1048576.0;
    let (packed_mib, json_mib) = (mib(&payloads), mib(&json));
    eprintln!(
        "{} envelopes, {packed_mib:.1} MiB packed ({json_mib:.1} MiB as JSON)",
        payloads.len()
    );

    // Where core-ingest's time goes, measured apart: decoding the envelopes alone, packed
    // and (older edges) JSON, alternately, best of three each.
    let decode_all = |payloads: &[Vec<u8>]| {
        let started = Instant::now();
        let n: usize = payloads
            .iter()
            .enumerate()
            .map(|(i, p)| beacon_ingest::decode(i as u64 + 1, p).envelope.raw.len())
            .sum();
        (n, started.elapsed().as_secs_f64())
    };
    let (mut decode_s, mut json_s) = (f64::MAX, f64::MAX);
    let mut decoded = 0;
    for _ in 0..3 {
        let (n, s) = decode_all(&payloads);
        let (m, j) = decode_all(&json);
        assert_eq!(n, m, "both encodings hold the same events");
        (decoded, decode_s, json_s) = (n, decode_s.min(s), json_s.min(j));
    }
    // Deduplication alone: every envelope's verdicts (what a commit adds per message, and
    // with the decoding what a restart's rebuild costs per message of its window).
    let received: Vec<Received> = payloads
        .iter()
        .enumerate()
        .map(|(i, p)| beacon_ingest::decode(i as u64 + 1, p))
        .collect();
    let mut state = Dedupe::new(dedupe::DEFAULT_WINDOW);
    let started = Instant::now();
    let verdicts: usize = received
        .iter()
        .map(|r| state.observe(&r.envelope, r.stored_at).raw.len())
        .sum();
    let observe_s = started.elapsed().as_secs_f64();
    assert_eq!(verdicts, 0, "generated events are all new");
    let (keys, heap) = (state.len(), state.heap_bytes());
    drop((state, received));
    let (bare_s, bare_rows) = bare_path(&payloads, per_commit).await;
    let (plain_s, plain_rows) = beacon_path(&payloads, per_commit, Duration::ZERO).await;
    let (beacon_s, beacon_rows) = beacon_path(&payloads, per_commit, dedupe::DEFAULT_WINDOW).await;
    assert_eq!(bare_rows, beacon_rows, "both paths write the same rows");
    assert_eq!(
        plain_rows, beacon_rows,
        "deduplication finds nothing to drop"
    );
    let bare = bare_rows as f64 / bare_s;
    let ours = beacon_rows as f64 / beacon_s;
    println!(
        "\n{events_n} events ({beacon_rows} rows in `raw_events` + `events`), envelopes of {per_envelope}, {per_commit} envelopes per commit ({} commits per table).\n",
        payloads.len().div_ceil(per_commit)
    );
    println!("| path | seconds | rows/s | vs bare writer |");
    println!("|---|---|---|---|");
    println!("| bare `iceberg` writer (Arrow in, defaults, tables one after the other) | {bare_s:.2} | {bare:.0} | 1.00x |");
    println!(
        "| core-ingest (packed envelopes in, sorted, zstd, tables concurrently) | {beacon_s:.2} | {ours:.0} | **{:.2}x** |",
        ours / bare
    );
    println!(
        "| core-ingest without per-event deduplication | {plain_s:.2} | {:.0} | {:.2}x |",
        plain_rows as f64 / plain_s,
        plain_rows as f64 / plain_s / bare
    );
    println!(
        "\nPer-event deduplication: core-ingest with it takes {:.2}x the time without it; its verdicts alone take {observe_s:.3} s for {decoded} events ({:.0} ns per event, {:.1}% of decoding them; {keys} keys held in {:.1} MiB, {:.0} bytes each). A restart's rebuild decodes and observes its window: about {:.0} events/s.",
        beacon_s / plain_s,
        1e9 * observe_s / decoded as f64,
        100.0 * observe_s / decode_s,
        heap as f64 / 1048576.0,
        heap as f64 / keys.max(1) as f64,
        decoded as f64 / (decode_s + observe_s)
    );
    println!(
        "\nDecoding the packed envelopes alone ({decoded} events, {packed_mib:.1} MiB): {decode_s:.2} s, {:.0}% of core-ingest's time. The same envelopes as JSON ({json_mib:.1} MiB): {json_s:.2} s; packed takes **{:.2}x** the time of JSON.",
        100.0 * decode_s / beacon_s,
        decode_s / json_s
    );
}
