//! `calc`: a real expression evaluator over f64 (never an `eval`).
//!
//! Grammar: numbers (`12`, `1.5`, `.5`, `1e3`), `+ - * / % ^`, parentheses, unary `-`/`+`,
//! functions `sqrt abs round floor ceil` (one argument) and `min max` (one or more), constants
//! `pi` and `e`, and variables passed in `variables` (a variable shadows a constant of the same
//! name). `^` is right-associative and binds tighter than unary minus (`-2^2` = -4). `%` is the
//! remainder with the sign of the dividend (`-7 % 3` = -1); `round` rounds half away from zero.
//! Division or modulo by zero, a non-finite result (overflow, `(-8)^(1/3)`), the square root of
//! a negative number, unknown names and syntax errors are reported with their column as an
//! `is_error` result.

mod parser;

use std::collections::HashMap;

use futures::future::BoxFuture;
use serde::Deserialize;
use serde_json::{Map, Value as Json, json};

use super::{Content, Tool, ToolContext, ToolOutput, parse_args};
use crate::Error;
use parser::{BinOp, Func, Op};

use parser::CalcError;

/// Longest expression accepted, in characters.
const MAX_EXPRESSION_CHARS: usize = 4096;

/// The calc tool.
pub(crate) struct Calc;

#[derive(Deserialize)]
struct Args {
    expression: String,
    #[serde(default)]
    variables: HashMap<String, f64>,
}

impl Tool for Calc {
    fn name(&self) -> &'static str {
        "calc"
    }

    fn description(&self) -> &'static str {
        "Evaluates an arithmetic expression: numbers, + - * / % ^ (right-associative), \
         parentheses, unary minus, sqrt abs min max round floor ceil, constants pi and e, and \
         named variables. Errors (division by zero, overflow, unknown names, syntax) name the \
         column."
    }

    fn input_schema(&self) -> Json {
        json!({
            "type": "object",
            "properties": {
                "expression": {
                    "type": "string",
                    "maxLength": MAX_EXPRESSION_CHARS,
                    "description": "The expression, e.g. \"2 * (x + 1) ^ 2\"."
                },
                "variables": {
                    "type": "object",
                    "description": "Values of the variables the expression uses.",
                    "propertyNames": {"pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
                    "additionalProperties": {"type": "number"}
                }
            },
            "required": ["expression"],
            "additionalProperties": false
        })
    }

    fn read_only(&self) -> bool {
        true
    }

    fn call<'a>(
        &'a self,
        _ctx: &'a ToolContext,
        args: Json,
    ) -> BoxFuture<'a, Result<ToolOutput, Error>> {
        Box::pin(async move {
            let args: Args = parse_args(args)?;
            Ok(match evaluate(&args.expression, &args.variables) {
                Ok(value) => {
                    let mut result = Map::new();
                    result.insert("result".to_owned(), number(value));
                    result.insert("expression".to_owned(), Json::String(args.expression));
                    let mut out = ToolOutput::object(result);
                    out.content = vec![Content::Text(format_number(value))];
                    out
                }
                Err(err) => ToolOutput::failed(format!("calc: {err}")),
            })
        })
    }
}

/// Evaluates `expression` with `variables`.
pub fn evaluate(expression: &str, variables: &HashMap<String, f64>) -> Result<f64, CalcError> {
    if expression.chars().count() > MAX_EXPRESSION_CHARS {
        return Err(CalcError {
            message: format!("the expression is longer than {MAX_EXPRESSION_CHARS} characters"),
            column: None,
        });
    }
    let program = parser::parse(expression)?;
    run(&program, variables)
}

fn run(program: &[Op], variables: &HashMap<String, f64>) -> Result<f64, CalcError> {
    let mut stack: Vec<f64> = Vec::with_capacity(16);
    let malformed = || CalcError {
        message: "internal error: malformed program".to_owned(),
        column: None,
    };
    for op in program {
        match op {
            Op::Num(n) => stack.push(*n),
            Op::Var { name, col } => {
                let value = variables
                    .get(name)
                    .copied()
                    .or_else(|| constant(name))
                    .ok_or_else(|| CalcError::at(*col, format!("unknown variable `{name}`")))?;
                stack.push(value);
            }
            Op::Neg => {
                let top = stack.last_mut().ok_or_else(malformed)?;
                *top = -*top;
            }
            Op::Bin { op, col } => {
                let (Some(b), Some(a)) = (stack.pop(), stack.pop()) else {
                    return Err(malformed());
                };
                stack.push(binary(*op, a, b, *col)?);
            }
            Op::Call { func, argc, col } => {
                let split = stack.len().checked_sub(*argc).ok_or_else(malformed)?;
                let args = stack.split_off(split);
                stack.push(call(*func, &args, *col)?);
            }
        }
    }
    match (stack.pop(), stack.is_empty()) {
        (Some(value), true) => Ok(value),
        _ => Err(malformed()),
    }
}

fn constant(name: &str) -> Option<f64> {
    match name {
        "pi" => Some(std::f64::consts::PI),
        "e" => Some(std::f64::consts::E),
        _ => None,
    }
}

fn binary(op: BinOp, a: f64, b: f64, col: usize) -> Result<f64, CalcError> {
    let (symbol, value) = match op {
        BinOp::Add => ("+", a + b),
        BinOp::Sub => ("-", a - b),
        BinOp::Mul => ("*", a * b),
        BinOp::Div if b == 0.0 => return Err(CalcError::at(col, "division by zero")),
        BinOp::Div => ("/", a / b),
        BinOp::Rem if b == 0.0 => return Err(CalcError::at(col, "modulo by zero")),
        BinOp::Rem => ("%", a % b),
        BinOp::Pow => ("^", a.powf(b)),
    };
    finite(value, symbol, col)
}

fn call(func: Func, args: &[f64], col: usize) -> Result<f64, CalcError> {
    let first = args.first().copied().ok_or_else(|| CalcError {
        message: "internal error: call without arguments".to_owned(),
        column: Some(col),
    })?;
    let (name, value) = match func {
        Func::Sqrt if first < 0.0 => {
            return Err(CalcError::at(
                col,
                format!("sqrt of a negative number ({})", format_number(first)),
            ));
        }
        Func::Sqrt => ("sqrt", first.sqrt()),
        Func::Abs => ("abs", first.abs()),
        Func::Round => ("round", first.round()),
        Func::Floor => ("floor", first.floor()),
        Func::Ceil => ("ceil", first.ceil()),
        Func::Min => ("min", args.iter().copied().fold(first, f64::min)),
        Func::Max => ("max", args.iter().copied().fold(first, f64::max)),
    };
    finite(value, name, col)
}

fn finite(value: f64, what: &str, col: usize) -> Result<f64, CalcError> {
    if value.is_nan() {
        Err(CalcError::at(
            col,
            format!("`{what}` has no real result here"),
        ))
    } else if value.is_infinite() {
        Err(CalcError::at(
            col,
            format!("overflow: the result of `{what}` is too large"),
        ))
    } else {
        Ok(value)
    }
}

/// Largest magnitude below which integral results are shown without a fraction.
const EXACT_INTEGER_LIMIT: f64 = 9_007_199_254_740_992.0;

/// Integral values as integers (`4`, not `4.0`), others in the shortest exact form.
fn format_number(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < EXACT_INTEGER_LIMIT {
        #[allow(clippy::cast_possible_truncation)]
        let int = value as i64;
        int.to_string()
    } else {
        value.to_string()
    }
}

fn number(value: f64) -> Json {
    if value.fract() == 0.0 && value.abs() < EXACT_INTEGER_LIMIT {
        #[allow(clippy::cast_possible_truncation)]
        return Json::from(value as i64);
    }
    serde_json::Number::from_f64(value).map_or(Json::Null, Json::Number)
}

#[cfg(test)]
mod tests;
