//! SQL fingerprints: one bounded label per query shape, so `SELECT * FROM leads WHERE id = 1`
//! and `select *  from leads where id=2 -- hot` group together.
//!
//! A small lexer, not a SQL parser: it knows PostgreSQL's literals (strings with `''`, `E''`
//! backslash escapes, `B''`, `X''`, `U&''`, dollar quoting, numbers), comments (`--` and nested
//! `/* */`), quoted identifiers and `$n` parameters, which is all a fingerprint needs.
//!
//! Must not: grow with the input. It reads at most [`MAX_INPUT_BYTES`] of the text and
//! returns at most [`MAX_FINGERPRINT_BYTES`].

/// How much of the SQL text is read.
pub const MAX_INPUT_BYTES: usize = 16 * 1024;
/// The longest fingerprint returned; a longer one ends in ` ...`.
pub const MAX_FINGERPRINT_BYTES: usize = 1024;
/// Tokens kept before rendering; enough for any fingerprint that fits the output bound once
/// lists are collapsed.
const MAX_TOKENS: usize = 4096;

/// The fingerprint of a SQL text.
///
/// - literals (strings, numbers, `TRUE`/`FALSE`, a `NULL` that is a value) become `?`, a
///   leading unary minus included; `$1` parameters stay `$1`; `IS NULL` stays;
/// - `IN (…)` and `ARRAY[…]` lists of literals and parameters become `IN (...)` and
///   `ARRAY[...]`, and the rows after the first in `VALUES (…), (…)` become `...`, so the
///   length of a list does not make a new fingerprint;
/// - comments are removed and whitespace normalised; keywords are upper case and other
///   unquoted names lower case (PostgreSQL folds them anyway); quoted names are kept;
/// - a trailing `;` is dropped; a text cut short by a capture bound collapses the same way.
pub fn fingerprint(sql: &str) -> String {
    let sql = &sql[..sql.floor_char_boundary(MAX_INPUT_BYTES)];
    let mut tokens = Vec::with_capacity(64);
    let mut lexer = Lexer { sql, pos: 0 };
    while let Some(token) = lexer.next_token() {
        if tokens.len() == MAX_TOKENS {
            break;
        }
        push_normalised(&mut tokens, token);
    }
    // Only a list keyword starts a collapse; most queries have none.
    if tokens.iter().any(|t| {
        t.kind == Kind::Keyword
            && (t.is_keyword("in") || t.is_keyword("array") || t.is_keyword("values"))
    }) {
        collapse_lists(&mut tokens);
    }
    while tokens.last().is_some_and(|t| t.kind == Kind::Semicolon) {
        tokens.pop();
    }
    render(&tokens)
}

/// The tables a SQL text names: after `FROM` and `JOIN` of a `SELECT` or `DELETE` (every
/// one of a comma list), `UPDATE` and `INTO`; schema-qualified where written so, unquoted
/// names folded to lower case, quoted ones kept; in order, once each. Names of the query's own
/// `WITH` tables and set-returning functions (`FROM generate_series(…)`) are left out, and so
/// is the `FROM` of `EXTRACT(… FROM …)`. A lexer's reading, not a parser's: what `analyze`
/// refreshes, never what decides anything else.
pub fn tables(sql: &str) -> Vec<String> {
    let sql = &sql[..sql.floor_char_boundary(MAX_INPUT_BYTES)];
    let mut lexer = Lexer { sql, pos: 0 };
    let mut tokens = Vec::with_capacity(64);
    while let Some(token) = lexer.next_token() {
        if tokens.len() == MAX_TOKENS {
            break;
        }
        tokens.push(token);
    }
    let is_name = |t: &Token<'_>| matches!(t.kind, Kind::Ident | Kind::Quoted);
    // A (possibly qualified) name starting at `i`, and the index after it.
    let name_at = |i: usize| -> Option<(String, usize)> {
        let mut parts = Vec::new();
        let mut j = i;
        loop {
            let token = tokens.get(j).filter(|t| is_name(t))?;
            parts.push(match token.kind {
                Kind::Quoted => token
                    .text
                    .get(1..token.text.len().saturating_sub(1))
                    .unwrap_or("")
                    .replace("\"\"", "\""),
                _ => token.text.to_ascii_lowercase(),
            });
            j += 1;
            if tokens.get(j).is_some_and(|t| t.kind == Kind::Dot) {
                j += 1;
            } else {
                return Some((parts.join("."), j));
            }
        }
    };
    // `WITH name AS (…)`: the query's own tables.
    let ctes: Vec<String> = (0..tokens.len())
        .filter(|&k| {
            tokens.get(k + 1).is_some_and(|t| t.is_keyword("as"))
                && tokens.get(k + 2).is_some_and(|t| {
                    t.kind == Kind::Open
                        || t.kind == Kind::Ident && t.text.eq_ignore_ascii_case("materialized")
                        || t.is_keyword("not")
                })
        })
        .filter_map(|k| name_at(k).map(|(name, _)| name))
        .collect();
    let mut found: Vec<String> = Vec::new();
    // Per parenthesis depth: whether a SELECT or DELETE was seen (a FROM of its own).
    let mut statement = vec![false];
    for (i, token) in tokens.iter().enumerate() {
        match token.kind {
            Kind::Open => statement.push(false),
            Kind::Close if statement.len() > 1 => {
                statement.pop();
            }
            _ => {}
        }
        if token.is_keyword("select") || token.is_keyword("delete") {
            if let Some(top) = statement.last_mut() {
                *top = true;
            }
        }
        let previous = i.checked_sub(1).and_then(|p| tokens.get(p));
        let from_list = token.is_keyword("from");
        let starts = if from_list || token.is_keyword("join") {
            statement.last() == Some(&true)
        } else if token.is_keyword("update") {
            // Not `FOR UPDATE` / `FOR NO KEY UPDATE` (a lock) nor `DO UPDATE` (an upsert).
            !previous
                .is_some_and(|p| p.is_keyword("for") || p.is_keyword("key") || p.is_keyword("do"))
        } else {
            token.is_keyword("into")
        };
        if !starts {
            continue;
        }
        let mut j = i + 1;
        if tokens.get(j).is_some_and(|t| t.is_keyword("only")) {
            j += 1;
        }
        while let Some((name, next)) = name_at(j) {
            // A set-returning function, not a table (`INTO t (columns)` is a table).
            if !token.is_keyword("into") && tokens.get(next).is_some_and(|t| t.kind == Kind::Open) {
                break;
            }
            if !ctes.contains(&name) && !found.contains(&name) {
                found.push(name);
            }
            if !from_list {
                break;
            }
            // `FROM a x, b AS y, c`: the next table after the alias and a comma.
            let mut k = next;
            if tokens.get(k).is_some_and(|t| t.is_keyword("as")) {
                k += 1;
            }
            if tokens.get(k).is_some_and(is_name) {
                k += 1;
            }
            if tokens.get(k).is_some_and(|t| t.kind == Kind::Comma) {
                j = k + 1;
            } else {
                break;
            }
        }
    }
    found
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Keyword,
    Ident,
    /// A quoted identifier, kept verbatim.
    Quoted,
    Literal,
    Param,
    Open,
    Close,
    OpenBracket,
    CloseBracket,
    Comma,
    Semicolon,
    Dot,
    Cast,
    Operator,
    Ellipsis,
}

#[derive(Debug, Clone, Copy)]
struct Token<'a> {
    kind: Kind,
    text: &'a str,
}

impl Token<'_> {
    fn is_value(&self) -> bool {
        matches!(self.kind, Kind::Literal | Kind::Param)
    }

    fn is_keyword(&self, keyword: &str) -> bool {
        self.kind == Kind::Keyword && self.text.eq_ignore_ascii_case(keyword)
    }
}

struct Lexer<'a> {
    sql: &'a str,
    pos: usize,
}

fn is_ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b >= 0x80
}

fn is_ident_continue(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80
}

fn is_operator_char(b: u8) -> bool {
    b"+-*/<>=~!@#%^&|`?".contains(&b)
}

impl<'a> Lexer<'a> {
    fn bytes(&self) -> &'a [u8] {
        self.sql.as_bytes()
    }

    fn peek(&self, offset: usize) -> Option<u8> {
        self.bytes().get(self.pos + offset).copied()
    }

    /// The text from `start` to the current position; both sit on ASCII bytes or the end.
    fn slice(&self, start: usize) -> &'a str {
        self.sql.get(start..self.pos).unwrap_or("")
    }

    fn token(&self, kind: Kind, start: usize) -> Token<'a> {
        Token {
            kind,
            text: self.slice(start),
        }
    }

    fn next_token(&mut self) -> Option<Token<'a>> {
        loop {
            let b = self.peek(0)?;
            let start = self.pos;
            match b {
                b' ' | b'\t' | b'\n' | b'\r' | b'\x0c' => self.pos += 1,
                b'-' if self.peek(1) == Some(b'-') => self.skip_line_comment(),
                b'/' if self.peek(1) == Some(b'*') => self.skip_block_comment(),
                b'\'' => {
                    self.skip_string(false);
                    return Some(self.token(Kind::Literal, start));
                }
                b'"' => {
                    self.skip_quoted_ident();
                    return Some(self.token(Kind::Quoted, start));
                }
                b'$' => return Some(self.dollar(start)),
                b'0'..=b'9' => {
                    self.skip_number();
                    return Some(self.token(Kind::Literal, start));
                }
                b'.' if self.peek(1).is_some_and(|b| b.is_ascii_digit()) => {
                    self.skip_number();
                    return Some(self.token(Kind::Literal, start));
                }
                b if is_ident_start(b) => return Some(self.word(start)),
                b'(' | b')' | b'[' | b']' | b',' | b';' | b'.' => {
                    self.pos += 1;
                    let kind = match b {
                        b'(' => Kind::Open,
                        b')' => Kind::Close,
                        b'[' => Kind::OpenBracket,
                        b']' => Kind::CloseBracket,
                        b',' => Kind::Comma,
                        b';' => Kind::Semicolon,
                        _ => Kind::Dot,
                    };
                    return Some(self.token(kind, start));
                }
                b':' => {
                    self.pos += 1;
                    if self.peek(0) == Some(b':') {
                        self.pos += 1;
                        return Some(self.token(Kind::Cast, start));
                    }
                    return Some(self.token(Kind::Operator, start));
                }
                b if is_operator_char(b) => {
                    while let Some(b) = self.peek(0) {
                        let comment = (b == b'-' && self.peek(1) == Some(b'-'))
                            || (b == b'/' && self.peek(1) == Some(b'*'));
                        if !is_operator_char(b) || (comment && self.pos > start) {
                            break;
                        }
                        self.pos += 1;
                    }
                    return Some(self.token(Kind::Operator, start));
                }
                _ => {
                    // Any other ASCII byte stands alone (`\`, `{`, control bytes).
                    self.pos += 1;
                    return Some(self.token(Kind::Operator, start));
                }
            }
        }
    }

    fn skip_line_comment(&mut self) {
        while let Some(b) = self.peek(0) {
            self.pos += 1;
            if b == b'\n' {
                break;
            }
        }
    }

    fn skip_block_comment(&mut self) {
        // PostgreSQL's block comments nest.
        let mut depth = 0u32;
        while let Some(b) = self.peek(0) {
            if b == b'/' && self.peek(1) == Some(b'*') {
                depth += 1;
                self.pos += 2;
            } else if b == b'*' && self.peek(1) == Some(b'/') {
                depth -= 1;
                self.pos += 2;
                if depth == 0 {
                    return;
                }
            } else {
                self.pos += 1;
            }
        }
    }

    /// Skips a `'…'` string from its opening quote; `backslashes` for `E'…'`.
    fn skip_string(&mut self, backslashes: bool) {
        self.pos += 1;
        while let Some(b) = self.peek(0) {
            self.pos += 1;
            if backslashes && b == b'\\' {
                if self.peek(0).is_some() {
                    self.pos += 1;
                }
            } else if b == b'\'' {
                if self.peek(0) == Some(b'\'') {
                    self.pos += 1;
                } else {
                    return;
                }
            }
        }
    }

    fn skip_quoted_ident(&mut self) {
        self.pos += 1;
        while let Some(b) = self.peek(0) {
            self.pos += 1;
            if b == b'"' {
                if self.peek(0) == Some(b'"') {
                    self.pos += 1;
                } else {
                    return;
                }
            }
        }
    }

    fn skip_number(&mut self) {
        let mut seen_exponent = false;
        while let Some(b) = self.peek(0) {
            let exponent_sign = (b == b'+' || b == b'-')
                && seen_exponent
                && matches!(self.bytes().get(self.pos - 1), Some(b'e' | b'E'));
            if b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || exponent_sign {
                // `1..5` is not a number followed by a number; stop before a second dot pair.
                if b == b'.' && self.peek(1) == Some(b'.') {
                    break;
                }
                seen_exponent |= b == b'e' || b == b'E';
                self.pos += 1;
            } else {
                break;
            }
        }
    }

    /// `$1` (a parameter), `$$…$$` or `$tag$…$tag$` (a string), or a lone `$`.
    fn dollar(&mut self, start: usize) -> Token<'a> {
        self.pos += 1;
        if self.peek(0).is_some_and(|b| b.is_ascii_digit()) {
            while self.peek(0).is_some_and(|b| b.is_ascii_digit()) {
                self.pos += 1;
            }
            return self.token(Kind::Param, start);
        }
        let tag_start = self.pos;
        while self
            .peek(0)
            .is_some_and(|b| is_ident_continue(b) && b != b'$')
        {
            self.pos += 1;
        }
        if self.peek(0) != Some(b'$') {
            self.pos = tag_start;
            return self.token(Kind::Operator, start);
        }
        self.pos += 1;
        let delimiter = &self.bytes()[start..self.pos];
        let body = &self.bytes()[self.pos..];
        self.pos = match body
            .windows(delimiter.len())
            .position(|window| window == delimiter)
        {
            Some(at) => self.pos + at + delimiter.len(),
            None => self.sql.len(),
        };
        self.token(Kind::Literal, start)
    }

    fn word(&mut self, start: usize) -> Token<'a> {
        while self.peek(0).is_some_and(is_ident_continue) {
            self.pos += 1;
        }
        let word = self.slice(start);
        // String prefixes: E'…' (escapes), B'…', X'…', N'…', U&'…'.
        if self.peek(0) == Some(b'\'') && word.len() == 1 {
            let escapes = word.eq_ignore_ascii_case("e");
            if escapes || ["b", "x", "n"].iter().any(|p| word.eq_ignore_ascii_case(p)) {
                self.skip_string(escapes);
                return self.token(Kind::Literal, start);
            }
        }
        if word.eq_ignore_ascii_case("u")
            && self.peek(0) == Some(b'&')
            && self.peek(1) == Some(b'\'')
        {
            self.pos += 1;
            self.skip_string(false);
            return self.token(Kind::Literal, start);
        }
        let kind = if is_keyword(word) {
            Kind::Keyword
        } else {
            Kind::Ident
        };
        Token { kind, text: word }
    }
}

/// Keywords printed in upper case (sorted, to keep the list tidy).
const KEYWORDS: &[&str] = &[
    "ADD",
    "ALL",
    "ALTER",
    "ANALYZE",
    "AND",
    "ANY",
    "ARRAY",
    "AS",
    "ASC",
    "BEGIN",
    "BETWEEN",
    "BY",
    "CASCADE",
    "CASE",
    "CAST",
    "CHECK",
    "CLOSE",
    "COLLATE",
    "COLUMN",
    "COMMIT",
    "CONFLICT",
    "CONSTRAINT",
    "COPY",
    "CREATE",
    "CROSS",
    "CURRENT_DATE",
    "CURSOR",
    "DEALLOCATE",
    "DECLARE",
    "DEFAULT",
    "DELETE",
    "DESC",
    "DISTINCT",
    "DO",
    "DROP",
    "ELSE",
    "END",
    "EXCEPT",
    "EXECUTE",
    "EXISTS",
    "EXPLAIN",
    "FALSE",
    "FETCH",
    "FILTER",
    "FIRST",
    "FOR",
    "FOREIGN",
    "FROM",
    "FULL",
    "FUNCTION",
    "GRANT",
    "GROUP",
    "HAVING",
    "IF",
    "ILIKE",
    "IN",
    "INDEX",
    "INNER",
    "INSERT",
    "INTERSECT",
    "INTERVAL",
    "INTO",
    "IS",
    "ISOLATION",
    "JOIN",
    "KEY",
    "LAST",
    "LATERAL",
    "LEFT",
    "LEVEL",
    "LIKE",
    "LIMIT",
    "LISTEN",
    "LOCK",
    "LOCKED",
    "MATCHED",
    "MERGE",
    "MOVE",
    "NATURAL",
    "NOT",
    "NOTHING",
    "NOTIFY",
    "NOWAIT",
    "NULL",
    "NULLS",
    "OFFSET",
    "ON",
    "ONLY",
    "OR",
    "ORDER",
    "OUTER",
    "OVER",
    "PARTITION",
    "PREPARE",
    "PRIMARY",
    "READ",
    "RECURSIVE",
    "REFERENCES",
    "RELEASE",
    "REPLACE",
    "RESET",
    "RETURNING",
    "REVOKE",
    "RIGHT",
    "ROLLBACK",
    "ROWS",
    "SAVEPOINT",
    "SCHEMA",
    "SELECT",
    "SET",
    "SHARE",
    "SHOW",
    "SIMILAR",
    "SKIP",
    "SOME",
    "START",
    "TABLE",
    "THEN",
    "TO",
    "TRANSACTION",
    "TRUE",
    "TRUNCATE",
    "UNION",
    "UNIQUE",
    "UNLISTEN",
    "UPDATE",
    "USING",
    "VACUUM",
    "VALUES",
    "VIEW",
    "WHEN",
    "WHERE",
    "WINDOW",
    "WITH",
    "WORK",
    "WRITE",
];

/// A keyword of at most 16 bytes as a number: big-endian and zero-padded.
const fn keyword_key(word: &[u8]) -> u128 {
    let mut key = 0u128;
    let mut i = 0;
    while i < 16 {
        key <<= 8;
        if i < word.len() {
            key |= word[i] as u128;
        }
        i += 1;
    }
    key
}

const KEYWORD_KEYS: [u128; KEYWORDS.len()] = {
    let mut keys = [0u128; KEYWORDS.len()];
    let mut i = 0;
    while i < KEYWORDS.len() {
        assert!(KEYWORDS[i].len() <= 16, "keywords fit a u128 key");
        keys[i] = keyword_key(KEYWORDS[i].as_bytes());
        i += 1;
    }
    keys
};

/// A perfect hash of the keyword keys, found at compile time: slot → index in [`KEYWORDS`]
/// (or `u8::MAX`), so a lookup is one probe and one compare.
const KEYWORD_HASH_BITS: u32 = 12;

const fn keyword_slot(key: u128, multiplier: u64) -> usize {
    // Short words live in the high half (big-endian, zero-padded): fold both halves.
    let folded = (key as u64) ^ ((key >> 64) as u64).rotate_left(29);
    (folded.wrapping_mul(multiplier) >> (64 - KEYWORD_HASH_BITS)) as usize
}

const KEYWORD_TABLE: (u64, [u8; 1 << KEYWORD_HASH_BITS]) = {
    assert!(KEYWORDS.len() < u8::MAX as usize);
    let mut multiplier = 0x9e37_79b9_7f4a_7c15_u64;
    loop {
        let mut table = [u8::MAX; 1 << KEYWORD_HASH_BITS];
        let mut i = 0;
        while i < KEYWORDS.len() {
            let slot = keyword_slot(KEYWORD_KEYS[i], multiplier);
            if table[slot] != u8::MAX {
                break;
            }
            table[slot] = i as u8;
            i += 1;
        }
        if i == KEYWORDS.len() {
            break (multiplier, table);
        }
        multiplier = multiplier.wrapping_add(0x2545_f491_4f6c_dd1d) | 1;
    }
};

fn is_keyword(word: &str) -> bool {
    if word.len() < 2 || word.len() > 16 {
        return false;
    }
    let mut upper = [0u8; 16];
    for (to, from) in upper.iter_mut().zip(word.bytes()) {
        *to = from.to_ascii_uppercase();
    }
    let key = u128::from_be_bytes(upper);
    let (multiplier, table) = &KEYWORD_TABLE;
    let index = table[keyword_slot(key, *multiplier)];
    KEYWORD_KEYS
        .get(usize::from(index))
        .is_some_and(|k| *k == key)
}

/// Appends a token with literals folded to `?`.
fn push_normalised<'a>(tokens: &mut Vec<Token<'a>>, mut token: Token<'a>) {
    if token.kind == Kind::Keyword {
        if token.is_keyword("true") || token.is_keyword("false") {
            token.kind = Kind::Literal;
        } else if token.is_keyword("null") {
            // `IS NULL` and `IS NOT NULL` are syntax; any other NULL is a value.
            let n = tokens.len();
            let after_is = n >= 1 && tokens[n - 1].is_keyword("is")
                || n >= 2 && tokens[n - 1].is_keyword("not") && tokens[n - 2].is_keyword("is");
            if !after_is {
                token.kind = Kind::Literal;
            }
        }
    }
    if token.kind == Kind::Literal {
        // A unary minus belongs to the literal: `x = -1` is `x = ?`.
        let n = tokens.len();
        if n >= 1 && tokens[n - 1].kind == Kind::Operator && tokens[n - 1].text == "-" {
            let unary = n == 1
                || matches!(
                    tokens[n - 2].kind,
                    Kind::Operator
                        | Kind::Keyword
                        | Kind::Open
                        | Kind::OpenBracket
                        | Kind::Comma
                        | Kind::Semicolon
                        | Kind::Cast
                );
            if unary {
                tokens.pop();
            }
        }
        token.text = "?";
    }
    tokens.push(token);
}

/// Collapses lists of values: `IN (…)`, `ARRAY[…]`, and the rows after the first of `VALUES`.
/// In place: a collapsed list is never longer than the list, so writes stay behind reads.
fn collapse_lists(tokens: &mut Vec<Token<'_>>) {
    const ELLIPSIS: Token<'static> = Token {
        kind: Kind::Ellipsis,
        text: "...",
    };
    const COMMA: Token<'static> = Token {
        kind: Kind::Comma,
        text: ",",
    };
    let mut read = 0;
    let mut write = 0;
    while read < tokens.len() {
        let token = tokens[read];
        let list = if token.is_keyword("in") {
            Some((Kind::Open, Kind::Close))
        } else if token.is_keyword("array") {
            Some((Kind::OpenBracket, Kind::CloseBracket))
        } else {
            None
        };
        if let Some((open, close)) = list {
            if tokens.get(read + 1).is_some_and(|t| t.kind == open) {
                if let Some(end) = value_list_end(tokens, read + 2, close) {
                    // `IN ( v )` at least: four tokens in, at most four out.
                    let opening = tokens[read + 1];
                    let closing = tokens.get(end).copied();
                    tokens[write] = token;
                    tokens[write + 1] = opening;
                    tokens[write + 2] = ELLIPSIS;
                    write += 3;
                    if let Some(closing) = closing {
                        tokens[write] = closing;
                        write += 1;
                    }
                    read = end + 1;
                    continue;
                }
            }
        }
        if token.is_keyword("values") {
            if let Some(after_first) = row_end(tokens, read + 1) {
                let mut next = after_first;
                let mut more = false;
                while tokens.get(next).is_some_and(|t| t.kind == Kind::Comma) {
                    match row_end(tokens, next + 1) {
                        Some(end) => {
                            more = true;
                            next = end;
                        }
                        None => break,
                    }
                }
                tokens.copy_within(read..after_first, write);
                write += after_first - read;
                if more {
                    // The rows after the first were at least `, ( )`: room for `, ...`.
                    tokens[write] = COMMA;
                    tokens[write + 1] = ELLIPSIS;
                    write += 2;
                }
                read = next;
                continue;
            }
        }
        tokens[write] = token;
        write += 1;
        read += 1;
    }
    tokens.truncate(write);
}

/// Where a list of values and commas starting at `from` is closed by `close` (its index), or
/// the end of the tokens when the text was cut inside the list.
fn value_list_end(tokens: &[Token<'_>], from: usize, close: Kind) -> Option<usize> {
    let mut expect_value = true;
    for (offset, token) in tokens[from.min(tokens.len())..].iter().enumerate() {
        match token.kind {
            kind if kind == close && !expect_value => return Some(from + offset),
            Kind::Comma if !expect_value => expect_value = true,
            _ if token.is_value() && expect_value => expect_value = false,
            _ => return None,
        }
    }
    (tokens.len() > from).then_some(tokens.len())
}

/// The index after a `( … )` row of values starting at `from` (nested parentheses allowed,
/// no keywords but `DEFAULT`), or the end when the text was cut inside it.
fn row_end(tokens: &[Token<'_>], from: usize) -> Option<usize> {
    if tokens.get(from)?.kind != Kind::Open {
        return None;
    }
    let mut depth = 0u32;
    for (offset, token) in tokens[from..].iter().enumerate() {
        match token.kind {
            Kind::Open => depth += 1,
            Kind::Close => {
                depth -= 1;
                if depth == 0 {
                    return Some(from + offset + 1);
                }
            }
            Kind::Keyword if !token.is_keyword("default") => return None,
            Kind::Semicolon => return None,
            _ => {}
        }
    }
    Some(tokens.len())
}

fn render(tokens: &[Token<'_>]) -> String {
    const CUT: &str = " ...";
    let mut out = String::with_capacity(
        tokens
            .iter()
            .map(|t| t.text.len() + 1)
            .sum::<usize>()
            .min(MAX_FINGERPRINT_BYTES),
    );
    let mut previous: Option<Kind> = None;
    // Inside a table name after `INTO`, `TABLE` or `REFERENCES`: a `(` opens a column list,
    // not a call.
    let mut table_name = false;
    for token in tokens {
        let space = previous.is_some_and(|previous| {
            space_between(previous, token.kind)
                || (table_name && token.kind == Kind::Open && previous != Kind::Dot)
        });
        table_name = match token.kind {
            Kind::Keyword => ["into", "table", "references"]
                .iter()
                .any(|k| token.text.eq_ignore_ascii_case(k)),
            Kind::Ident | Kind::Quoted | Kind::Dot => table_name,
            _ => false,
        };
        if out.len() + usize::from(space) + token.text.len() > MAX_FINGERPRINT_BYTES - CUT.len() {
            out.push_str(CUT);
            return out;
        }
        if space {
            out.push(' ');
        }
        match token.kind {
            // ASCII case changes keep UTF-8 valid, so whole slices are converted in place.
            Kind::Keyword => {
                let start = out.len();
                out.push_str(token.text);
                out[start..].make_ascii_uppercase();
            }
            Kind::Ident => {
                let start = out.len();
                out.push_str(token.text);
                out[start..].make_ascii_lowercase();
            }
            _ => out.push_str(token.text),
        }
        previous = Some(token.kind);
    }
    out
}

fn space_between(previous: Kind, current: Kind) -> bool {
    use Kind::{
        Cast, Close, CloseBracket, Comma, Dot, Ident, Keyword, Open, OpenBracket, Quoted, Semicolon,
    };
    if matches!(
        current,
        Comma | Close | CloseBracket | Semicolon | Dot | Cast
    ) || matches!(previous, Open | OpenBracket | Dot | Cast)
    {
        return false;
    }
    match current {
        // A call `count(` or a subscript `a[`; a keyword keeps its space: `IN (`.
        Open => !matches!(previous, Ident | Quoted),
        OpenBracket => !matches!(previous, Ident | Quoted | Keyword | Close | CloseBracket),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_read_from_the_statement() {
        let cases: &[(&str, &[&str])] = &[
            ("SELECT pg_sleep($1)", &[]),
            ("SELECT * FROM Leads WHERE id = $1", &["leads"]),
            (
                "SELECT l.id, c.name FROM leads l JOIN public.campaigns AS c ON c.id = l.campaign_id",
                &["leads", "public.campaigns"],
            ),
            ("SELECT 1 FROM a, b AS y, \"Odd\"\"Name\" z", &["a", "b", "Odd\"Name"]),
            ("UPDATE deals SET stage = $1 WHERE id = $2", &["deals"]),
            ("INSERT INTO events (kind) VALUES ($1) ON CONFLICT DO UPDATE SET kind = $1", &["events"]),
            ("DELETE FROM ONLY sessions WHERE expires < now()", &["sessions"]),
            ("SELECT * FROM jobs WHERE id = $1 FOR UPDATE SKIP LOCKED", &["jobs"]),
            ("SELECT EXTRACT(year FROM created) FROM leads", &["leads"]),
            ("SELECT * FROM generate_series(1, 10) g JOIN leads ON true", &["leads"]),
            (
                "WITH recent AS (SELECT * FROM leads WHERE id > $1) SELECT * FROM recent",
                &["leads"],
            ),
            ("SELECT id FROM a WHERE id IN (SELECT a_id FROM b)", &["a", "b"]),
            ("SELECT * FROM leads JOIN leads ON true", &["leads"]),
        ];
        for (sql, want) in cases {
            assert_eq!(tables(sql), *want, "{sql}");
        }
    }

    #[test]
    fn literals_comments_whitespace_and_case_are_normalised() {
        let cases = [
            (
                "select *  from leads\n where id=1 -- hot path",
                "SELECT * FROM leads WHERE id = ?",
            ),
            (
                "SELECT * FROM leads WHERE id = 2",
                "SELECT * FROM leads WHERE id = ?",
            ),
            (
                "SELECT name FROM users WHERE email = 'a@b.c' AND age > -3.5e+2",
                "SELECT name FROM users WHERE email = ? AND age > ?",
            ),
            (
                "select a /* one /* nested */ still */ from t where b = $1 and c = E'it\\'s'",
                "SELECT a FROM t WHERE b = $1 AND c = ?",
            ),
            (
                "SELECT $$dollar ' quoted$$, $tag$x$tag$, x'1F', true, NULL",
                "SELECT ?, ?, ?, ?, ?",
            ),
            (
                "SELECT * FROM t WHERE deleted_at IS NULL AND x IS NOT NULL",
                "SELECT * FROM t WHERE deleted_at IS NULL AND x IS NOT NULL",
            ),
            (
                "SELECT \"Mixed\".\"Col\" FROM \"Mixed\" WHERE a::int = '5'::int;",
                "SELECT \"Mixed\".\"Col\" FROM \"Mixed\" WHERE a::int = ?::int",
            ),
            (
                "SELECT count(*), Max(t.x) FROM T",
                "SELECT count(*), max(t.x) FROM t",
            ),
            ("BEGIN", "BEGIN"),
            ("  ", ""),
        ];
        for (sql, want) in cases {
            assert_eq!(fingerprint(sql), want, "{sql}");
        }
    }

    #[test]
    fn lists_collapse_whatever_their_length() {
        let one = fingerprint("SELECT * FROM t WHERE id IN (1)");
        let many = fingerprint("SELECT * FROM t WHERE id IN (1, 2, 3, 'x', $4)");
        assert_eq!(one, "SELECT * FROM t WHERE id IN (...)");
        assert_eq!(one, many);
        assert_eq!(
            fingerprint("SELECT * FROM t WHERE id = ANY(ARRAY[1,2,3])"),
            "SELECT * FROM t WHERE id = ANY (ARRAY[...])"
        );
        assert_eq!(
            fingerprint("SELECT * FROM t WHERE id IN (SELECT id FROM u)"),
            "SELECT * FROM t WHERE id IN (SELECT id FROM u)"
        );
        assert_eq!(
            fingerprint("INSERT INTO t (a, b) VALUES ($1, $2), ($3, $4), ($5, DEFAULT)"),
            "INSERT INTO t (a, b) VALUES ($1, $2), ..."
        );
        assert_eq!(
            fingerprint("INSERT INTO t (a, b) VALUES (1, 'x') RETURNING id"),
            "INSERT INTO t (a, b) VALUES (?, ?) RETURNING id"
        );
    }

    #[test]
    fn text_cut_inside_a_list_collapses_the_same_way() {
        let short = fingerprint("SELECT * FROM t WHERE id IN (1, 2, 3");
        let long = fingerprint("SELECT * FROM t WHERE id IN (1, 22, 333, 4444, 5");
        assert_eq!(short, "SELECT * FROM t WHERE id IN (...");
        assert_eq!(short, long);
    }

    #[test]
    fn output_is_bounded_and_unterminated_input_is_fine() {
        let huge = format!("SELECT {} FROM t", "a, ".repeat(10_000));
        let fp = fingerprint(&huge);
        assert!(fp.len() <= MAX_FINGERPRINT_BYTES);
        assert!(fp.ends_with(" ..."));
        for sql in [
            "'unterminated",
            "/* open",
            "$tag$ open",
            "\"open",
            "E'\\",
            "$",
            "-",
            "1e",
        ] {
            assert!(fingerprint(sql).len() <= MAX_FINGERPRINT_BYTES);
        }
        assert_eq!(
            fingerprint("SELECT 'é' || ñame FROM t"),
            "SELECT ? || ñame FROM t"
        );
    }

    #[test]
    fn keywords_are_sorted_and_all_found() {
        assert!(KEYWORDS.windows(2).all(|w| w[0] < w[1]));
        assert!(KEYWORDS.iter().all(|k| is_keyword(&k.to_ascii_lowercase())));
        assert!(!is_keyword("leads") && !is_keyword("x") && !is_keyword(&"a".repeat(40)));
    }
}
