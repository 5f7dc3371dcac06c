//! HyperLogLog sketches as SQL functions, so unique visitors merge over any range.
//!
//! - `hll_sketch(value)`: aggregate, builds a sketch (BINARY) from string values.
//! - `hll_union(sketch)`: aggregate, merges sketches into one.
//! - `hll_estimate(sketch)`: scalar, the distinct-count estimate of a sketch.
//!
//! Sketches are Apache DataSketches HLL images (`datasketches` crate), lg_k = 14: relative
//! standard error about 0.65% for one sketch and 0.81% after unions. A 30-day visitor count
//! is `hll_estimate(hll_union(visitors_hll))` over the 720 hourly sketches: a true distinct
//! estimate, not a sum of hourly uniques.

use std::any::Any;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Float64Array};
use arrow::datatypes::{DataType, Field, FieldRef};
use datafusion::common::{exec_err, Result, ScalarValue};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, ColumnarValue, ScalarFunctionArgs, ScalarUDF,
    ScalarUDFImpl, Signature, TypeSignature, Volatility,
};
use datafusion::prelude::SessionContext;
use datasketches::hll::{HllSketch, HllType, HllUnion};

pub const LG_K: u8 = 14;
const STORED_TYPE: HllType = HllType::Hll4;

pub fn register(ctx: &SessionContext) {
    ctx.register_udaf(AggregateUDF::from(HllAgg::new("hll_sketch", Input::Values)));
    ctx.register_udaf(AggregateUDF::from(HllAgg::new(
        "hll_union",
        Input::Sketches,
    )));
    ctx.register_udf(ScalarUDF::from(HllEstimate::new()));
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Input {
    Values,
    Sketches,
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct HllAgg {
    name: &'static str,
    input: Input,
    signature: Signature,
}

impl HllAgg {
    fn new(name: &'static str, input: Input) -> Self {
        let types = match input {
            Input::Values => vec![DataType::Utf8, DataType::LargeUtf8, DataType::Utf8View],
            Input::Sketches => vec![
                DataType::Binary,
                DataType::LargeBinary,
                DataType::BinaryView,
            ],
        };
        Self {
            name,
            input,
            signature: Signature::one_of(
                types
                    .into_iter()
                    .map(|t| TypeSignature::Exact(vec![t]))
                    .collect(),
                Volatility::Immutable,
            ),
        }
    }
}

impl AggregateUDFImpl for HllAgg {
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn name(&self) -> &str {
        self.name
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Binary)
    }
    fn accumulator(&self, _args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        Ok(Box::new(HllAccumulator::new(self.input)?))
    }
    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        Ok(vec![Arc::new(Field::new(
            format!("{}_sketch", args.name),
            DataType::Binary,
            true,
        ))])
    }
}

#[derive(Debug)]
struct HllAccumulator {
    input: Input,
    union: HllUnion,
}

impl HllAccumulator {
    fn new(input: Input) -> Result<Self> {
        let union = HllUnion::new(LG_K)
            .map_err(|e| datafusion::error::DataFusionError::Execution(e.to_string()))?;
        Ok(Self { input, union })
    }

    fn merge_sketches(&mut self, array: &ArrayRef) -> Result<()> {
        for i in 0..array.len() {
            if array.is_null(i) {
                continue;
            }
            let bytes: &[u8] = match array.data_type() {
                DataType::Binary => array.as_binary::<i32>().value(i),
                DataType::LargeBinary => array.as_binary::<i64>().value(i),
                DataType::BinaryView => array.as_binary_view().value(i),
                other => return exec_err!("hll_union expects BINARY sketches, got {other}"),
            };
            match HllSketch::deserialize(bytes) {
                Ok(s) => self.union.update(&s),
                Err(e) => return exec_err!("not an HLL sketch: {e}"),
            }
        }
        Ok(())
    }
}

impl Accumulator for HllAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let Some(array) = values.first() else {
            return Ok(());
        };
        match self.input {
            Input::Sketches => self.merge_sketches(array),
            Input::Values => {
                macro_rules! feed {
                    ($arr:expr) => {
                        for v in $arr.iter().flatten() {
                            self.union.update_value(v);
                        }
                    };
                }
                match array.data_type() {
                    DataType::Utf8 => feed!(array.as_string::<i32>()),
                    DataType::LargeUtf8 => feed!(array.as_string::<i64>()),
                    DataType::Utf8View => feed!(array.as_string_view()),
                    other => return exec_err!("hll_sketch expects strings, got {other}"),
                }
                Ok(())
            }
        }
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        Ok(ScalarValue::Binary(Some(
            self.union.to_sketch(STORED_TYPE).serialize(),
        )))
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self) + self.union.estimated_size()
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        Ok(vec![self.evaluate()?])
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        match states.first() {
            Some(a) => self.merge_sketches(a),
            None => Ok(()),
        }
    }
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct HllEstimate {
    signature: Signature,
}

impl HllEstimate {
    fn new() -> Self {
        Self {
            signature: Signature::one_of(
                vec![
                    TypeSignature::Exact(vec![DataType::Binary]),
                    TypeSignature::Exact(vec![DataType::LargeBinary]),
                ],
                Volatility::Immutable,
            ),
        }
    }
}

impl ScalarUDFImpl for HllEstimate {
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn name(&self) -> &str {
        "hll_estimate"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Float64)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let Some(array) = arrays.first() else {
            return exec_err!("hll_estimate takes one argument");
        };
        let values: Vec<Option<&[u8]>> = match array.data_type() {
            DataType::Binary => array.as_binary::<i32>().iter().collect(),
            DataType::LargeBinary => array.as_binary::<i64>().iter().collect(),
            other => return exec_err!("hll_estimate expects a BINARY sketch, got {other}"),
        };
        let mut out = Vec::with_capacity(values.len());
        for v in values {
            out.push(match v {
                None => None,
                Some(bytes) => match HllSketch::deserialize(bytes) {
                    Ok(s) => Some(s.estimate()),
                    Err(e) => return exec_err!("not an HLL sketch: {e}"),
                },
            });
        }
        Ok(ColumnarValue::Array(Arc::new(Float64Array::from(out))))
    }
}

/// Estimates the distinct count of `values` the same way the SQL functions do (tests, tools).
pub fn estimate_distinct<'a>(values: impl IntoIterator<Item = &'a str>) -> f64 {
    let mut union = match HllUnion::new(LG_K) {
        Ok(u) => u,
        Err(_) => return 0.0,
    };
    for v in values {
        union.update_value(v);
    }
    union.estimate()
}
