//! Tokenizer and Pratt parser for `calc`. The parser emits a postfix program, so evaluation is
//! a loop over a value stack: only nesting (parentheses, unary signs, `^` chains, function
//! arguments) recurses, and that is capped at [`MAX_DEPTH`].

use std::fmt;

/// Deepest nesting the parser accepts.
pub(super) const MAX_DEPTH: usize = 256;

/// A calc failure, with the 1-based column it refers to when there is one.
#[derive(Clone, Debug, PartialEq)]
pub struct CalcError {
    /// What went wrong.
    pub message: String,
    /// 1-based character column.
    pub column: Option<usize>,
}

impl CalcError {
    pub(super) fn at(column: usize, message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            column: Some(column),
        }
    }
}

impl fmt::Display for CalcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.column {
            Some(col) => write!(f, "{} at column {col}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Num(f64),
    Ident(String),
    Plus,
    Minus,
    Star,
    Slash,
    Percent,
    Caret,
    LParen,
    RParen,
    Comma,
    End,
}

impl fmt::Display for Tok {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tok::Num(n) => write!(f, "number {n}"),
            Tok::Ident(name) => write!(f, "`{name}`"),
            Tok::Plus => f.write_str("`+`"),
            Tok::Minus => f.write_str("`-`"),
            Tok::Star => f.write_str("`*`"),
            Tok::Slash => f.write_str("`/`"),
            Tok::Percent => f.write_str("`%`"),
            Tok::Caret => f.write_str("`^`"),
            Tok::LParen => f.write_str("`(`"),
            Tok::RParen => f.write_str("`)`"),
            Tok::Comma => f.write_str("`,`"),
            Tok::End => f.write_str("the end of the expression"),
        }
    }
}

#[derive(Clone, Debug)]
struct Token {
    tok: Tok,
    col: usize,
}

fn tokenize(src: &str) -> Result<Vec<Token>, CalcError> {
    let chars: Vec<char> = src.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let col = i + 1;
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        if c.is_ascii_digit() || c == '.' {
            let start = i;
            while i < chars.len() && chars[i].is_ascii_digit() {
                i += 1;
            }
            if i < chars.len() && chars[i] == '.' {
                i += 1;
                while i < chars.len() && chars[i].is_ascii_digit() {
                    i += 1;
                }
            }
            let mantissa_digits = chars[start..i]
                .iter()
                .filter(|c| c.is_ascii_digit())
                .count();
            if mantissa_digits == 0 {
                return Err(CalcError::at(col, "syntax error: `.` is not a number"));
            }
            if i < chars.len() && matches!(chars[i], 'e' | 'E') {
                let mut j = i + 1;
                if j < chars.len() && matches!(chars[j], '+' | '-') {
                    j += 1;
                }
                let digits_start = j;
                while j < chars.len() && chars[j].is_ascii_digit() {
                    j += 1;
                }
                if j == digits_start {
                    return Err(CalcError::at(
                        col,
                        "syntax error: the exponent of this number has no digits",
                    ));
                }
                i = j;
            }
            let text: String = chars[start..i].iter().collect();
            let value: f64 = text.parse().map_err(|_| {
                CalcError::at(col, format!("syntax error: malformed number `{text}`"))
            })?;
            if !value.is_finite() {
                return Err(CalcError::at(
                    col,
                    format!("overflow: number `{text}` is too large"),
                ));
            }
            tokens.push(Token {
                tok: Tok::Num(value),
                col,
            });
            continue;
        }
        if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            tokens.push(Token {
                tok: Tok::Ident(chars[start..i].iter().collect()),
                col,
            });
            continue;
        }
        let tok = match c {
            '+' => Tok::Plus,
            '-' => Tok::Minus,
            '*' => Tok::Star,
            '/' => Tok::Slash,
            '%' => Tok::Percent,
            '^' => Tok::Caret,
            '(' => Tok::LParen,
            ')' => Tok::RParen,
            ',' => Tok::Comma,
            other => {
                return Err(CalcError::at(
                    col,
                    format!("syntax error: unexpected character `{other}`"),
                ));
            }
        };
        tokens.push(Token { tok, col });
        i += 1;
    }
    tokens.push(Token {
        tok: Tok::End,
        col: chars.len() + 1,
    });
    Ok(tokens)
}

/// A binary operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
    Pow,
}

/// A built-in function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Func {
    Sqrt,
    Abs,
    Min,
    Max,
    Round,
    Floor,
    Ceil,
}

/// Names of the built-in functions, for messages.
pub(super) const FUNCTIONS: &str = "sqrt, abs, min, max, round, floor, ceil";

impl Func {
    fn lookup(name: &str) -> Option<Self> {
        Some(match name {
            "sqrt" => Self::Sqrt,
            "abs" => Self::Abs,
            "min" => Self::Min,
            "max" => Self::Max,
            "round" => Self::Round,
            "floor" => Self::Floor,
            "ceil" => Self::Ceil,
            _ => return None,
        })
    }

    fn variadic(self) -> bool {
        matches!(self, Self::Min | Self::Max)
    }
}

/// One step of the postfix program.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Op {
    /// Push a literal.
    Num(f64),
    /// Push a variable or constant.
    Var { name: String, col: usize },
    /// Negate the top of the stack.
    Neg,
    /// Pop two, push the result.
    Bin { op: BinOp, col: usize },
    /// Pop `argc`, push the result.
    Call { func: Func, argc: usize, col: usize },
}

/// Parses an expression into a postfix program.
pub(super) fn parse(src: &str) -> Result<Vec<Op>, CalcError> {
    let tokens = tokenize(src)?;
    let mut parser = Parser {
        tokens: &tokens,
        pos: 0,
        out: Vec::with_capacity(tokens.len()),
        depth: 0,
    };
    parser.expr(0)?;
    let rest = parser.peek();
    if rest.tok != Tok::End {
        return Err(CalcError::at(
            rest.col,
            format!("syntax error: expected an operator, found {}", rest.tok),
        ));
    }
    Ok(parser.out)
}

struct Parser<'a> {
    tokens: &'a [Token],
    pos: usize,
    out: Vec<Op>,
    depth: usize,
}

/// Binding power of a unary sign: looser than `^` (so -2^2 = -4), tighter than `*`.
const UNARY_BP: u8 = 5;

impl Parser<'_> {
    fn peek(&self) -> &Token {
        // The token list always ends with `End`, and `next` never moves past it.
        &self.tokens[self.pos.min(self.tokens.len() - 1)]
    }

    fn next(&mut self) -> Token {
        let token = self.peek().clone();
        if token.tok != Tok::End {
            self.pos += 1;
        }
        token
    }

    fn expr(&mut self, min_bp: u8) -> Result<(), CalcError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(CalcError::at(
                self.peek().col,
                format!("the expression nests deeper than {MAX_DEPTH} levels"),
            ));
        }
        self.prefix()?;
        loop {
            let token = self.peek();
            let col = token.col;
            // (operator, left binding power, right binding power); `^` is right-associative.
            let (op, lbp, rbp) = match token.tok {
                Tok::Plus => (BinOp::Add, 1, 2),
                Tok::Minus => (BinOp::Sub, 1, 2),
                Tok::Star => (BinOp::Mul, 3, 4),
                Tok::Slash => (BinOp::Div, 3, 4),
                Tok::Percent => (BinOp::Rem, 3, 4),
                Tok::Caret => (BinOp::Pow, 7, 6),
                _ => break,
            };
            if lbp < min_bp {
                break;
            }
            self.next();
            self.expr(rbp)?;
            self.out.push(Op::Bin { op, col });
        }
        self.depth -= 1;
        Ok(())
    }

    fn prefix(&mut self) -> Result<(), CalcError> {
        let Token { tok, col } = self.next();
        match tok {
            Tok::Num(n) => self.out.push(Op::Num(n)),
            Tok::Minus => {
                self.expr(UNARY_BP)?;
                self.out.push(Op::Neg);
            }
            Tok::Plus => self.expr(UNARY_BP)?,
            Tok::LParen => {
                self.expr(0)?;
                self.expect_close(col)?;
            }
            Tok::Ident(name) if self.peek().tok == Tok::LParen => {
                self.next();
                self.call(name, col)?;
            }
            Tok::Ident(name) => self.out.push(Op::Var { name, col }),
            Tok::End => {
                return Err(CalcError::at(
                    col,
                    "syntax error: the expression ends where a value was expected",
                ));
            }
            other => {
                return Err(CalcError::at(
                    col,
                    format!("syntax error: expected a value, found {other}"),
                ));
            }
        }
        Ok(())
    }

    fn call(&mut self, name: String, col: usize) -> Result<(), CalcError> {
        let Some(func) = Func::lookup(&name) else {
            return Err(CalcError::at(
                col,
                format!("unknown function `{name}` (available: {FUNCTIONS})"),
            ));
        };
        let mut argc = 0;
        if self.peek().tok == Tok::RParen {
            self.next();
        } else {
            loop {
                self.expr(0)?;
                argc += 1;
                let Token { tok, col: at } = self.next();
                match tok {
                    Tok::Comma => continue,
                    Tok::RParen => break,
                    other => {
                        return Err(CalcError::at(
                            at,
                            format!(
                                "syntax error: expected `,` or `)` in the call to `{name}`, found {other}"
                            ),
                        ));
                    }
                }
            }
        }
        if func.variadic() && argc == 0 {
            return Err(CalcError::at(
                col,
                format!("`{name}` needs at least 1 argument"),
            ));
        }
        if !func.variadic() && argc != 1 {
            return Err(CalcError::at(
                col,
                format!("`{name}` takes exactly 1 argument, got {argc}"),
            ));
        }
        self.out.push(Op::Call { func, argc, col });
        Ok(())
    }

    fn expect_close(&mut self, open_col: usize) -> Result<(), CalcError> {
        let Token { tok, col } = self.next();
        if tok == Tok::RParen {
            Ok(())
        } else {
            Err(CalcError::at(
                col,
                format!(
                    "syntax error: expected `)` to close the `(` at column {open_col}, found {tok}"
                ),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emits_postfix_with_precedence() {
        let ops = parse("1 + 2 * 3").expect("parse");
        assert_eq!(
            ops,
            vec![
                Op::Num(1.0),
                Op::Num(2.0),
                Op::Num(3.0),
                Op::Bin {
                    op: BinOp::Mul,
                    col: 7
                },
                Op::Bin {
                    op: BinOp::Add,
                    col: 3
                },
            ]
        );
    }

    #[test]
    fn tokenizes_number_forms() {
        for (src, want) in [
            ("1e3", 1000.0),
            (".5", 0.5),
            ("2.", 2.0),
            ("1.5E-2", 0.015),
            ("007", 7.0),
        ] {
            assert_eq!(parse(src).expect(src), vec![Op::Num(want)], "{src}");
        }
        assert!(parse("1e").is_err());
        assert!(parse("1e+").is_err());
        assert!(parse(".").is_err());
    }
}
