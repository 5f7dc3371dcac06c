//! Rendering query results for people (aligned table) and programs (JSON, CSV).

use arrow::record_batch::RecordBatch;

use crate::WarehouseError;

pub fn table(batches: &[RecordBatch]) -> Result<String, WarehouseError> {
    let mut s = arrow::util::pretty::pretty_format_batches(batches)?.to_string();
    s.push('\n');
    Ok(s)
}

/// A JSON array of row objects.
pub fn json(batches: &[RecordBatch]) -> Result<String, WarehouseError> {
    let mut w = arrow::json::ArrayWriter::new(Vec::new());
    let refs: Vec<&RecordBatch> = batches.iter().collect();
    w.write_batches(&refs)?;
    w.finish()?;
    let mut out = String::from_utf8_lossy(&w.into_inner()).into_owned();
    if out.is_empty() {
        out.push_str("[]");
    }
    out.push('\n');
    Ok(out)
}

/// The rows as JSON objects (for programs that work on values, like the metrics API).
pub fn json_rows(batches: &[RecordBatch]) -> Result<Vec<serde_json::Value>, WarehouseError> {
    if batches.iter().all(|b| b.num_rows() == 0) {
        return Ok(Vec::new());
    }
    Ok(serde_json::from_str(&json(batches)?)?)
}

pub fn csv(batches: &[RecordBatch]) -> Result<String, WarehouseError> {
    let mut buf = Vec::new();
    {
        let mut w = arrow::csv::WriterBuilder::new()
            .with_header(true)
            .build(&mut buf);
        for b in batches {
            w.write(b)?;
        }
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}
