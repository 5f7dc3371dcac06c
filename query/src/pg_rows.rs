//! What the Postgres wire needs beyond DataFusion's rows: map columns as JSON text (the
//! protocol has no map type; `properties` is one), and a few hand-made messages.

use std::any::Any;
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, StringBuilder};
use datafusion::arrow::datatypes::DataType;
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use datafusion::common::Column;
use datafusion::error::Result;
use datafusion::logical_expr::{
    ColumnarValue, Expr, LogicalPlan, LogicalPlanBuilder, ScalarFunctionArgs, ScalarUDF,
    ScalarUDFImpl, Signature, Volatility,
};
use datafusion_postgres::pgwire;
use pgwire::api::results::{DataRowEncoder, FieldFormat, FieldInfo, QueryResponse};
use pgwire::api::Type;
use pgwire::error::PgWireResult;

/// `beacon_map_json(map) -> text`: a map as a JSON object of its entries (values as text).
pub fn map_to_json_udf() -> ScalarUDF {
    ScalarUDF::new_from_impl(MapToJson {
        signature: Signature::any(1, Volatility::Immutable),
    })
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct MapToJson {
    signature: Signature,
}

impl ScalarUDFImpl for MapToJson {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn name(&self) -> &str {
        "beacon_map_json"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Utf8)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let array = match args.args.first() {
            Some(v) => v.clone().into_array(args.number_rows)?,
            None => {
                return Err(datafusion::error::DataFusionError::Plan(
                    "beacon_map_json takes one argument".into(),
                ))
            }
        };
        Ok(ColumnarValue::Array(maps_to_json(&array)?))
    }
}

/// Each map of `array` as a JSON object (NULL stays NULL); other arrays as their text.
fn maps_to_json(array: &ArrayRef) -> Result<ArrayRef> {
    let options = FormatOptions::default();
    let mut out = StringBuilder::with_capacity(array.len(), array.len() * 32);
    let Some(maps) = array.as_map_opt() else {
        let f = ArrayFormatter::try_new(array.as_ref(), &options)?;
        for i in 0..array.len() {
            if array.is_null(i) {
                out.append_null();
            } else {
                out.append_value(f.value(i).to_string());
            }
        }
        return Ok(Arc::new(out.finish()));
    };
    let (keys, values) = (maps.keys(), maps.values());
    let kf = ArrayFormatter::try_new(keys.as_ref(), &options)?;
    let vf = ArrayFormatter::try_new(values.as_ref(), &options)?;
    let offsets = maps.value_offsets();
    for row in 0..maps.len() {
        if maps.is_null(row) {
            out.append_null();
            continue;
        }
        let mut object = serde_json::Map::new();
        for i in offsets[row] as usize..offsets[row + 1] as usize {
            let value = if values.is_null(i) {
                serde_json::Value::Null
            } else {
                serde_json::Value::String(vf.value(i).to_string())
            };
            object.insert(kf.value(i).to_string(), value);
        }
        out.append_value(serde_json::Value::Object(object).to_string());
    }
    Ok(Arc::new(out.finish()))
}

/// `plan` with every map column of its output replaced by its JSON text (same name).
pub fn maps_as_json(plan: LogicalPlan) -> Result<LogicalPlan> {
    let schema = plan.schema().clone();
    if !schema
        .fields()
        .iter()
        .any(|f| matches!(f.data_type(), DataType::Map(..)))
    {
        return Ok(plan);
    }
    let udf = Arc::new(map_to_json_udf());
    let exprs = schema
        .iter()
        .map(|(qualifier, field)| {
            let column = Expr::Column(Column::new(qualifier.cloned(), field.name()));
            if matches!(field.data_type(), DataType::Map(..)) {
                udf.call(vec![column])
                    .alias_qualified(qualifier.cloned(), field.name())
            } else {
                column
            }
        })
        .collect::<Vec<_>>();
    LogicalPlanBuilder::from(plan).project(exprs)?.build()
}

/// A one-row, one-column text answer (`SHOW x`).
pub fn single_value(name: &str, value: &str) -> PgWireResult<QueryResponse> {
    let fields = Arc::new(vec![FieldInfo::new(
        name.to_string(),
        None,
        None,
        Type::VARCHAR,
        FieldFormat::Text,
    )]);
    let mut encoder = DataRowEncoder::new(fields.clone());
    encoder.encode_field(&Some(value))?;
    let row = encoder.take_row();
    Ok(QueryResponse::new(
        fields,
        Box::pin(futures::stream::once(async move { Ok(row) })),
    ))
}

/// A Postgres `ErrorResponse` with severity FATAL, as raw bytes (sent to a connection
/// refused before its startup message was read; libpq prints the message).
pub fn fatal_error(code: &str, message: &str) -> Vec<u8> {
    let mut body = Vec::new();
    for (tag, value) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', code),
        (b'M', message),
    ] {
        body.push(tag);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut msg = vec![b'E'];
    msg.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    msg.extend_from_slice(&body);
    msg
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::prelude::SessionContext;

    #[tokio::test]
    async fn map_columns_become_json_text_and_others_stay() {
        let ctx = SessionContext::new();
        let plan = ctx
            .sql("SELECT 1 AS n, map(['a', 'b'], ['x', 'y']) AS properties")
            .await
            .unwrap()
            .into_unoptimized_plan();
        let plan = maps_as_json(plan).unwrap();
        let batches = ctx
            .execute_logical_plan(plan)
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let schema = batches[0].schema();
        assert_eq!(schema.field(0).name(), "n");
        assert_eq!(schema.field(1).name(), "properties");
        assert_eq!(schema.field(1).data_type(), &DataType::Utf8);
        let text = batches[0].column(1).as_string::<i32>().value(0).to_string();
        assert_eq!(text, r#"{"a":"x","b":"y"}"#);
    }

    #[test]
    fn the_fatal_error_message_is_framed_as_postgres_expects() {
        let m = fatal_error("53300", "too many");
        assert_eq!(m[0], b'E');
        let len = i32::from_be_bytes([m[1], m[2], m[3], m[4]]) as usize;
        assert_eq!(len + 1, m.len());
        assert!(m.ends_with(b"too many\0\0"));
    }
}
