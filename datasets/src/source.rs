//! The bytes the Parquet decoder reads a dataset file through, and the check of the Thrift
//! structures it parses (the footer, every page header) before it parses them.
//!
//! The Parquet decoder (parquet 60) spends time and memory that a small corrupt file does not
//! bound, so a file of 2 KB could keep it busy for seconds to minutes (found by fuzzing,
//! target `parquet`):
//! - it skips a list, set or map of booleans by counting its elements without reading them:
//!   a footer holding an unknown list of two billion booleans took 20 s to open; a file may
//!   hold many such lists;
//! - it reads page headers from a [`Read`] and skips unknown bytes with [`io::copy`], which takes
//!   the end of the file for the end of the field: a header declaring a list of two billion
//!   fields at the end of the file issued one empty `read` per field;
//! - it zero-fills a buffer of the size a page header declares (the page's uncompressed size, a
//!   dictionary's number of values) before decoding into it: 2 GiB behind 34 bytes cost 3 s
//!   of page faults per page.
//!
//! [`check_footer`] and [`check_page_header`] walk a compact-Thrift struct with every element
//! consuming input, refusing collections of booleans (no field of a Parquet footer or page
//! header is one), anything that does not fit in the input, and known fields of another type
//! than the decoder reads them as (it reads those by the format's type, whatever their header
//! says); their work is bounded by the input's length. The footer is checked so when a dataset
//! is opened; [`DataSource`] checks each page header so, and its sizes, before the decoder
//! reads it, and its readers fail at the end of the file instead of returning an empty read.
//! A valid file decodes exactly as through [`File`].

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};

use bytes::Bytes;
use parquet::file::reader::{ChunkReader, Length};

/// Nesting the check follows before it refuses a struct (the decoder's own skip limit).
const MAX_DEPTH: u32 = 64;

/// Bytes of the footer's tail: the footer's length (4) and the magic `PAR1` (4).
pub(crate) const FOOTER_TAIL: u64 = 8;

/// Why a Thrift structure was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Corrupt(pub(crate) String);

impl std::fmt::Display for Corrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Input of the check: one byte at a time, or a run of bytes to pass over.
pub(crate) trait ThriftInput {
    /// The next byte; an error at the end.
    fn byte(&mut self) -> Result<u8, Corrupt>;
    /// Passes over `n` bytes; an error if fewer remain.
    fn skip(&mut self, n: u64) -> Result<(), Corrupt>;
}

fn ended() -> Corrupt {
    Corrupt("the input ends inside a Thrift structure".into())
}

impl ThriftInput for &[u8] {
    fn byte(&mut self) -> Result<u8, Corrupt> {
        let (first, rest) = self.split_first().ok_or_else(ended)?;
        *self = rest;
        Ok(*first)
    }

    fn skip(&mut self, n: u64) -> Result<(), Corrupt> {
        let n = usize::try_from(n)
            .ok()
            .filter(|n| *n <= self.len())
            .ok_or_else(ended)?;
        *self = &self[n..];
        Ok(())
    }
}

/// A [`Read`] as [`ThriftInput`].
struct Stream<R>(R);

impl<R: Read> ThriftInput for Stream<R> {
    fn byte(&mut self) -> Result<u8, Corrupt> {
        let mut b = [0u8];
        self.0.read_exact(&mut b).map_err(|_| ended())?;
        Ok(b[0])
    }

    fn skip(&mut self, n: u64) -> Result<(), Corrupt> {
        let passed = io::copy(&mut (&mut self.0).take(n), &mut io::sink()).map_err(|_| ended())?;
        if passed == n {
            Ok(())
        } else {
            Err(ended())
        }
    }
}

fn varint(input: &mut impl ThriftInput) -> Result<u64, Corrupt> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let b = input.byte()?;
        value |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(Corrupt("a varint longer than 10 bytes".into()))
}

fn size(input: &mut impl ThriftInput) -> Result<u64, Corrupt> {
    let n = varint(input)?;
    if n > i32::MAX as u64 {
        return Err(Corrupt(format!("a collection of {n} elements")));
    }
    Ok(n)
}

fn is_bool(element_type: u8) -> bool {
    matches!(element_type, 1 | 2)
}

/// Checks one value of compact type `kind` (a struct field's type; 12 is a struct).
fn check_value(input: &mut impl ThriftInput, kind: u8, depth: u32) -> Result<(), Corrupt> {
    match kind {
        // A struct field's boolean lives in its field header.
        1 | 2 => Ok(()),
        3 => input.byte().map(drop),
        4..=6 => varint(input).map(drop),
        7 => input.skip(8),
        8 => {
            let len = varint(input)?;
            input.skip(len)
        }
        9 | 10 => {
            let header = input.byte()?;
            let element = header & 0x0f;
            let n = match header >> 4 {
                15 => size(input)?,
                n => u64::from(n),
            };
            check_elements(input, n, &[element], depth)
        }
        11 => {
            let n = size(input)?;
            if n == 0 {
                return Ok(());
            }
            let kv = input.byte()?;
            check_elements(input, n, &[kv >> 4, kv & 0x0f], depth)
        }
        12 => check_fields(input, depth, &[], &mut Vec::new(), &mut |_, _| {}),
        13 => input.skip(16),
        other => Err(Corrupt(format!("unknown Thrift type {other}"))),
    }
}

/// What the decoder reads a known field as, whatever type its header says.
#[derive(Debug, Clone, Copy)]
enum Known {
    /// A value of this compact type (booleans: either).
    Value(u8),
    /// A list of these.
    List(&'static Known),
    /// A struct with these known fields.
    Struct(&'static [(i16, Known)]),
}

const BOOL: Known = Known::Value(1);
const BYTE: Known = Known::Value(3);
const I16: Known = Known::Value(4);
const I32: Known = Known::Value(5);
const I64: Known = Known::Value(6);
const DOUBLE: Known = Known::Value(7);
const BINARY: Known = Known::Value(8);
const EMPTY: Known = Known::Struct(&[]);

/// The fields of a page header the decoder reads by the format's type (parquet.thrift's
/// `PageHeader`; the statistics, and every field not listed, it skips by their header's type).
const PAGE_HEADER: &[(i16, Known)] = &[
    (1, I32),
    (2, I32),
    (3, I32),
    (4, I32),
    (5, Known::Struct(&[(1, I32), (2, I32), (3, I32), (4, I32)])),
    (6, EMPTY),
    (7, Known::Struct(&[(1, I32), (2, I32), (3, BOOL)])),
    (
        8,
        Known::Struct(&[
            (1, I32),
            (2, I32),
            (3, I32),
            (4, I32),
            (5, I32),
            (6, I32),
            (7, BOOL),
        ]),
    ),
];

const TIME_UNIT: Known = Known::Struct(&[(1, EMPTY), (2, EMPTY), (3, EMPTY)]);
const TIME: Known = Known::Struct(&[(1, BOOL), (2, TIME_UNIT)]);

/// parquet.thrift's `LogicalType` union.
const LOGICAL_TYPE: Known = Known::Struct(&[
    (1, EMPTY),
    (2, EMPTY),
    (3, EMPTY),
    (4, EMPTY),
    (5, Known::Struct(&[(1, I32), (2, I32)])),
    (6, EMPTY),
    (7, TIME),
    (8, TIME),
    (10, Known::Struct(&[(1, BYTE), (2, BOOL)])),
    (11, EMPTY),
    (12, EMPTY),
    (13, EMPTY),
    (14, EMPTY),
    (15, EMPTY),
    (16, Known::Struct(&[(1, BYTE)])),
    (17, Known::Struct(&[(1, BINARY)])),
    (18, Known::Struct(&[(1, BINARY), (2, I32)])),
    (19, EMPTY),
]);

const SCHEMA_ELEMENT: Known = Known::Struct(&[
    (1, I32),
    (2, I32),
    (3, I32),
    (4, BINARY),
    (5, I32),
    (6, I32),
    (7, I32),
    (8, I32),
    (9, I32),
    (10, LOGICAL_TYPE),
]);

const KEY_VALUE: Known = Known::Struct(&[(1, BINARY), (2, BINARY)]);

const STATISTICS: Known = Known::Struct(&[
    (1, BINARY),
    (2, BINARY),
    (3, I64),
    (4, I64),
    (5, BINARY),
    (6, BINARY),
    (7, BOOL),
    (8, BOOL),
    (9, I64),
]);

const COLUMN_META_DATA: Known = Known::Struct(&[
    (1, I32),
    (2, Known::List(&I32)),
    (3, Known::List(&BINARY)),
    (4, I32),
    (5, I64),
    (6, I64),
    (7, I64),
    (8, Known::List(&KEY_VALUE)),
    (9, I64),
    (10, I64),
    (11, I64),
    (12, STATISTICS),
    (
        13,
        Known::List(&Known::Struct(&[(1, I32), (2, I32), (3, I32)])),
    ),
    (14, I64),
    (15, I32),
    (
        16,
        Known::Struct(&[(1, I64), (2, Known::List(&I64)), (3, Known::List(&I64))]),
    ),
    (
        17,
        Known::Struct(&[
            (
                1,
                Known::Struct(&[
                    (1, DOUBLE),
                    (2, DOUBLE),
                    (3, DOUBLE),
                    (4, DOUBLE),
                    (5, DOUBLE),
                    (6, DOUBLE),
                    (7, DOUBLE),
                    (8, DOUBLE),
                ]),
            ),
            (2, Known::List(&I32)),
        ]),
    ),
]);

const COLUMN_CHUNK: Known = Known::Struct(&[
    (1, BINARY),
    (2, I64),
    (3, COLUMN_META_DATA),
    (4, I64),
    (5, I32),
    (6, I64),
    (7, I32),
    (
        8,
        Known::Struct(&[
            (1, EMPTY),
            (2, Known::Struct(&[(1, Known::List(&BINARY)), (2, BINARY)])),
        ]),
    ),
    (9, BINARY),
]);

const ROW_GROUP: Known = Known::Struct(&[
    (1, Known::List(&COLUMN_CHUNK)),
    (2, I64),
    (3, I64),
    (
        4,
        Known::List(&Known::Struct(&[(1, I32), (2, BOOL), (3, BOOL)])),
    ),
    (5, I64),
    (6, I64),
    (7, I16),
]);

const AES_GCM: Known = Known::Struct(&[(1, BINARY), (2, BINARY), (3, BOOL)]);

/// The fields of a footer the decoder reads by the format's type (parquet.thrift's
/// `FileMetaData`, down to every struct, union and list in it).
const FILE_META_DATA: &[(i16, Known)] = &[
    (1, I32),
    (2, Known::List(&SCHEMA_ELEMENT)),
    (3, I64),
    (4, Known::List(&ROW_GROUP)),
    (5, Known::List(&KEY_VALUE)),
    (6, BINARY),
    (7, Known::List(&Known::Struct(&[(1, EMPTY)]))),
    (8, Known::Struct(&[(1, AES_GCM), (2, AES_GCM)])),
    (9, BINARY),
];

/// The name of a compact type.
fn type_name(kind: u8) -> &'static str {
    match kind {
        1 | 2 => "bool",
        3 => "byte",
        4 => "i16",
        5 => "i32",
        6 => "i64",
        7 => "double",
        8 => "binary",
        9 => "list",
        10 => "set",
        11 => "map",
        12 => "struct",
        13 => "uuid",
        _ => "unknown",
    }
}

impl Known {
    /// Whether a value of compact type `kind` is what the decoder reads.
    fn admits(self, kind: u8) -> bool {
        match self {
            Known::Value(1) => matches!(kind, 1 | 2),
            // Integers of every width are varints: read as another width, they take the same bytes.
            Known::Value(4..=6) => matches!(kind, 4..=6),
            Known::Value(t) => kind == t,
            Known::List(_) => matches!(kind, 9 | 10),
            Known::Struct(_) => kind == 12,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Known::Value(t) => type_name(t),
            Known::List(_) => "list",
            Known::Struct(_) => "struct",
        }
    }
}

/// Hands the field ids from the outermost struct down to an integer field, and its value as
/// the decoder reads it ([`as_read`]).
type Visit<'v> = &'v mut dyn FnMut(&[i16], i64);

/// Checks a struct's fields up to its stop. A field of `known` must have the type the decoder
/// reads it as: it reads such fields by the format's type, not the header's, so a field of
/// another type would have it read other bytes than this check did, and skip what this check
/// never saw. Integer fields reached through structs alone go to `visit`.
fn check_fields<I: ThriftInput>(
    input: &mut I,
    depth: u32,
    known: &[(i16, Known)],
    path: &mut Vec<i16>,
    visit: Visit,
) -> Result<(), Corrupt> {
    let depth = depth
        .checked_sub(1)
        .ok_or_else(|| Corrupt(format!("structs nested over {MAX_DEPTH} deep")))?;
    let mut id = 0i16;
    loop {
        let header = input.byte()?;
        let kind = header & 0x0f;
        if kind == 0 {
            return Ok(());
        }
        id = match header >> 4 {
            0 => zigzag(varint(input)?) as i16,
            delta => id.wrapping_add(i16::from(delta)),
        };
        path.push(id);
        let expected = known.iter().find(|(k, _)| *k == id).map(|(_, t)| *t);
        check_typed(input, kind, expected, depth, path, visit)?;
        path.pop();
    }
}

/// Checks one value of compact type `kind`, which must be what `expected` admits.
fn check_typed<I: ThriftInput>(
    input: &mut I,
    kind: u8,
    expected: Option<Known>,
    depth: u32,
    path: &mut Vec<i16>,
    visit: Visit,
) -> Result<(), Corrupt> {
    if let Some(t) = expected.filter(|t| !t.admits(kind)) {
        return Err(Corrupt(format!(
            "field {path:?} is a Thrift {}; the format has {} there",
            type_name(kind),
            t.name()
        )));
    }
    match (expected, kind) {
        (_, 4..=6) => visit(path, as_read(expected, zigzag(varint(input)?))),
        (Some(Known::Struct(fields)), _) => check_fields(input, depth, fields, path, visit)?,
        (None, 12) => check_fields(input, depth, &[], path, visit)?,
        (Some(Known::List(element)), _) => {
            let header = input.byte()?;
            let n = match header >> 4 {
                15 => size(input)?,
                n => u64::from(n),
            };
            let kind = header & 0x0f;
            if n > 0 && !element.admits(kind) {
                return Err(Corrupt(format!(
                    "field {path:?} is a list of Thrift {}; the format has a list of {} there",
                    type_name(kind),
                    element.name()
                )));
            }
            if n > 0 && is_bool(kind) {
                return Err(booleans(n));
            }
            let depth = depth
                .checked_sub(1)
                .ok_or_else(|| Corrupt(format!("collections nested over {MAX_DEPTH} deep")))?;
            for _ in 0..n {
                check_typed(input, kind, Some(*element), depth, path, visit)?;
            }
        }
        _ => check_value(input, kind, depth)?,
    }
    Ok(())
}

/// An integer as the decoder reads a field the format declares `expected`: it truncates the
/// varint to the declared width (`read_zig_zag() as i32`), so a 64-bit value of -2,281,701,376
/// in an i32 field is 2,013,265,920 to it. Fields the format does not declare pass whole.
fn as_read(expected: Option<Known>, value: i64) -> i64 {
    match expected {
        Some(Known::Value(4)) => i64::from(value as i16),
        Some(Known::Value(5)) => i64::from(value as i32),
        _ => value,
    }
}

fn zigzag(n: u64) -> i64 {
    (n >> 1) as i64 ^ -((n & 1) as i64)
}

/// Uncompressed bytes a page may declare whatever its compressed size: more than any
/// common writer puts in one page (1 MiB by default in parquet-rs, Arrow C++ and parquet-java).
pub(crate) const PAGE_FLOOR: i64 = 16 << 20;

/// Above [`PAGE_FLOOR`], the most uncompressed bytes a page may declare per compressed byte.
pub(crate) const PAGE_RATIO: i64 = 1024;

/// Checks a page header like [`check_footer`] a footer, its known fields' types (`PAGE_HEADER`),
/// and
/// the sizes the decoder allocates by:
/// - its uncompressed size (field 2) is at most the larger of [`PAGE_FLOOR`] and
///   [`PAGE_RATIO`] times its compressed size (field 3): the decoder zero-fills a buffer of the
///   declared size before decompressing into it, so a header declaring 2 GiB behind a few bytes
///   cost seconds of page faults per page;
/// - a dictionary page's number of values (field 7's field 1) fits in its uncompressed size at
///   4 bytes a value: the decoder zero-fills room for them before decoding. elbo decodes only
///   columns of 4- and 8-byte values (`x`, `label`, `id`), each at least 4 bytes in a
///   dictionary page.
pub(crate) fn check_page_header(input: &mut impl ThriftInput) -> Result<(), Corrupt> {
    let (mut uncompressed, mut compressed, mut dictionary) = (None, None, None);
    check_fields(
        input,
        MAX_DEPTH,
        PAGE_HEADER,
        &mut Vec::new(),
        &mut |path, value| match path {
            [2] => uncompressed = Some(value),
            [3] => compressed = Some(value),
            [7, 1] => dictionary = Some(value),
            _ => {}
        },
    )?;
    let Some(u) = uncompressed else {
        return Ok(());
    };
    if let Some(c) = compressed {
        let most = PAGE_FLOOR.max(c.saturating_mul(PAGE_RATIO));
        if u > most {
            return Err(Corrupt(format!(
                "a page of {c} compressed bytes declares {u} uncompressed bytes; expected at \
                 most {most} ({PAGE_RATIO} per compressed byte, or {PAGE_FLOOR} in any page)"
            )));
        }
    }
    if let Some(n) = dictionary.filter(|n| n.saturating_mul(4) > u) {
        return Err(Corrupt(format!(
            "a dictionary page of {u} uncompressed bytes declares {n} values; expected at most \
             {} (4 bytes a value)",
            u / 4
        )));
    }
    Ok(())
}

fn booleans(n: u64) -> Corrupt {
    Corrupt(format!(
        "a collection of {n} booleans, which no Parquet footer or page header holds"
    ))
}

/// Checks that `input` starts with a footer: a compact-Thrift struct whose every element
/// consumes input, with no collection of booleans, nested at most [`MAX_DEPTH`] deep, and that its known fields have the types the decoder
/// reads them as (`FILE_META_DATA`).
pub(crate) fn check_footer(input: &mut impl ThriftInput) -> Result<(), Corrupt> {
    check_fields(
        input,
        MAX_DEPTH,
        FILE_META_DATA,
        &mut Vec::new(),
        &mut |_, _| {},
    )
}

/// Checks `n` elements, each a value of every type in `types` (one for lists, two for maps).
fn check_elements(
    input: &mut impl ThriftInput,
    n: u64,
    types: &[u8],
    depth: u32,
) -> Result<(), Corrupt> {
    if n == 0 {
        return Ok(());
    }
    if types.iter().any(|t| is_bool(*t)) {
        return Err(booleans(n));
    }
    if types.iter().any(|t| *t == 0 || *t > 13) {
        return Err(Corrupt(format!("a collection of unknown type {types:?}")));
    }
    let depth = depth
        .checked_sub(1)
        .ok_or_else(|| Corrupt(format!("collections nested over {MAX_DEPTH} deep")))?;
    for _ in 0..n {
        for t in types {
            check_value(input, *t, depth)?;
        }
    }
    Ok(())
}

/// A dataset file opened for decoding row groups: each page header is checked with
/// [`check_page_header`] before the decoder parses it, and reading past the end is an error.
pub(crate) struct DataSource(File);

impl DataSource {
    /// Wraps an opened file.
    pub(crate) fn new(file: File) -> Self {
        DataSource(file)
    }
}

impl Length for DataSource {
    fn len(&self) -> u64 {
        self.0.len()
    }
}

impl ChunkReader for DataSource {
    type T = HeaderRead;

    /// The decoder reads through this only the footer's tail and page headers; a reader at a
    /// page header checks it on its first read (the decoder also opens one at page data it
    /// then reads with [`ChunkReader::get_bytes`], never reading this one).
    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        let mut file = self.0.try_clone()?;
        file.seek(SeekFrom::Start(start))?;
        let is_tail = start.checked_add(FOOTER_TAIL) == Some(self.len());
        Ok(HeaderRead {
            inner: BufReader::new(EndIsError(file)),
            unchecked_at: (!is_tail).then_some(start),
        })
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        self.0.get_bytes(start, length)
    }
}

/// A reader at a page header (or the footer's tail): the header is checked on the first read.
pub(crate) struct HeaderRead {
    inner: BufReader<EndIsError<File>>,
    unchecked_at: Option<u64>,
}

impl Read for HeaderRead {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(start) = self.unchecked_at.take() {
            // The check reads through the same file position, then returns to the header.
            let mut stream = Stream(BufReader::new(&mut self.inner.get_mut().0));
            check_page_header(&mut stream).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("corrupt page header at byte {start}: {e}"),
                )
            })?;
            self.inner.get_mut().0.seek(SeekFrom::Start(start))?;
        }
        self.inner.read(buf)
    }
}

/// A reader whose end is an error: reading into a non-empty buffer at the end fails with
/// [`io::ErrorKind::UnexpectedEof`].
pub(crate) struct EndIsError<R>(R);

impl<R: Read> Read for EndIsError<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.0.read(buf)? {
            0 if !buf.is_empty() => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file ends inside a page",
            )),
            n => Ok(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks a struct with no known fields.
    fn check_struct(input: &mut impl ThriftInput) -> Result<(), Corrupt> {
        check_fields(input, MAX_DEPTH, &[], &mut Vec::new(), &mut |_, _| {})
    }

    fn check(bytes: &[u8]) -> Result<(), Corrupt> {
        let mut input = bytes;
        check_struct(&mut input)
    }

    fn message(bytes: &[u8]) -> String {
        check(bytes).unwrap_err().0
    }

    /// A struct holding one field of every type, the way a Thrift writer lays it out.
    const EVERY_TYPE: &[u8] = &[
        0x11, // field 1, true
        0x12, // field 2, false
        0x13, 0x7f, // field 3, byte
        0x14, 0x02, // field 4, i16 1
        0x15, 0xac, 0x02, // field 5, i32 150
        0x16, 0x01, // field 6, i64
        0x17, 0, 0, 0, 0, 0, 0, 0xf0, 0x3f, // field 7, double 1.0
        0x18, 0x02, b'h', b'i', // field 8, binary "hi"
        0x19, 0x25, 0x02, 0x04, // field 9, list of two i32
        0x1a, 0x18, 0x01, b'x', // field 10, set of one binary
        0x1b, 0x01, 0x55, 0x02, 0x04, // field 11, map of one i32 → i32
        0x1c, 0x15, 0x00, 0x00, // field 12, struct { field 1: i32 0 }
        0x1d, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // field 13, uuid
        0x05, 0xfe, 0x03, 0x02, // field 255 in long form, i32
        0x09, 0x00, 0x00, // field 0 in long form, a list with the empty-list header 0
        0x00, // stop
    ];

    #[test]
    fn a_struct_of_every_type_passes_and_ends_at_its_stop() {
        let mut input = [EVERY_TYPE, b"trailing"].concat();
        let mut rest = &input[..];
        check_struct(&mut rest).unwrap();
        assert_eq!(rest, b"trailing");
        input.truncate(EVERY_TYPE.len() - 1);
        assert!(message(&input).contains("ends inside"));
        // A stop is any header whose type nibble is 0.
        assert_eq!(check(&[0x15, 0x00, 0x70]), Ok(()));
    }

    #[test]
    fn every_cut_of_a_valid_struct_is_refused() {
        for cut in 0..EVERY_TYPE.len() {
            assert!(check(&EVERY_TYPE[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn collections_of_booleans_are_refused_whatever_their_size() {
        for bytes in [
            &[0x19, 0x11, 0x01, 0x00][..],               // list of one true
            &[0x19, 0xf2, 0xff, 0xff, 0xff, 0xff, 0x07], // list of i32::MAX false
            &[0x1a, 0x21, 0x01, 0x01, 0x00],             // set of two
            &[0x1b, 0x01, 0x15, 0x01, 0x02, 0x00],       // map bool → i32
            &[0x1b, 0x01, 0x51, 0x02, 0x01, 0x00],       // map i32 → bool
        ] {
            assert!(message(bytes).contains("booleans"), "{bytes:?}");
        }
        // An empty one is fine.
        assert_eq!(check(&[0x19, 0x01, 0x00]), Ok(()));
    }

    #[test]
    fn sizes_and_lengths_past_the_input_or_the_type_are_refused() {
        // A list of i32::MAX bytes holding three.
        assert!(message(&[0x19, 0xf3, 0xff, 0xff, 0xff, 0xff, 0x07, 1, 2, 3]).contains("ends"));
        // A list size over i32::MAX.
        assert!(message(&[0x19, 0xf3, 0x80, 0x80, 0x80, 0x80, 0x08]).contains("collection of"));
        // A binary longer than the input.
        assert!(message(&[0x18, 0x10, b'a']).contains("ends"));
        // An 11-byte varint.
        assert!(
            message(&[0x16, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01])
                .contains("varint")
        );
        // Unknown field and element types.
        assert!(message(&[0x1e, 0x00]).contains("unknown Thrift type 14"));
        assert!(message(&[0x19, 0x1e, 0x00]).contains("unknown type"));
    }

    #[test]
    fn nesting_is_bounded() {
        let deep = |n: usize| [vec![0x1c; n], vec![0x00; n + 1]].concat();
        assert_eq!(check(&deep(MAX_DEPTH as usize - 1)), Ok(()));
        assert!(message(&deep(MAX_DEPTH as usize)).contains("nested"));
        let lists = |n: usize| [vec![0x19], vec![0x19; n], vec![0x00; 2]].concat();
        assert_eq!(check(&lists(MAX_DEPTH as usize - 2)), Ok(()));
        assert!(message(&lists(MAX_DEPTH as usize)).contains("nested"));
    }

    fn varint_of(n: i64) -> Vec<u8> {
        let mut z = ((n << 1) ^ (n >> 63)) as u64;
        let mut out = vec![];
        loop {
            let low = (z & 0x7f) as u8;
            z >>= 7;
            if z == 0 {
                out.push(low);
                return out;
            }
            out.push(low | 0x80);
        }
    }

    /// A page header's first fields: type 0, then the uncompressed and compressed sizes.
    fn page_header(uncompressed: i64, compressed: i64) -> Vec<u8> {
        [
            &[0x15, 0x00, 0x15][..],
            &varint_of(uncompressed),
            &[0x15],
            &varint_of(compressed),
            &[0x00],
        ]
        .concat()
    }

    #[test]
    fn a_page_may_declare_the_floor_or_the_ratio_whichever_is_larger() {
        let check_page = |u: i64, c: i64| check_page_header(&mut &page_header(u, c)[..]);
        assert_eq!(check_page(PAGE_FLOOR, 1), Ok(()));
        assert!(check_page(PAGE_FLOOR + 1, 1)
            .unwrap_err()
            .0
            .contains("declares 16777217"));
        let c = PAGE_FLOOR / PAGE_RATIO + 7;
        assert_eq!(check_page(c * PAGE_RATIO, c), Ok(()));
        assert!(check_page(c * PAGE_RATIO + 1, c).is_err());
        assert_eq!(check_page(i32::MAX.into(), i32::MAX.into()), Ok(()));
        // Field ids in long form count too; a header without the sizes is left to the decoder.
        let long_form = [
            0x05, 0x04, 0xfe, 0xff, 0xff, 0xff, 0x0f, 0x05, 0x06, 0x02, 0x00,
        ];
        assert!(check_page_header(&mut &long_form[..]).is_err());
        assert_eq!(check_page_header(&mut &[0x15, 0x02, 0x00][..]), Ok(()));
    }

    #[test]
    fn a_known_page_header_field_of_another_type_is_refused() {
        // Field 2 (an i32) written as a list of one byte: read as an i32, the decoder would take
        // the list's header for the value and the element for the next field.
        let err = check_page_header(&mut &[0x15, 0x00, 0x19, 0x13, 0x05, 0x00][..]).unwrap_err();
        assert!(
            err.0
                .contains("field [2] is a Thrift list; the format has i32 there"),
            "{err}"
        );
        // Field 7's field 3 (a bool) written as an i32; an unknown field 9 may be anything.
        let err = check_page_header(&mut &[0x7c, 0x35, 0x00, 0x00, 0x00][..]).unwrap_err();
        assert!(err.0.contains("field [7, 3]"), "{err}");
        assert_eq!(
            check_page_header(&mut &[0x99, 0x13, 0x05, 0x00][..]),
            Ok(())
        );
    }

    #[test]
    fn a_footer_field_or_list_element_of_another_type_than_the_format_is_refused() {
        let footer = |bytes: &[u8]| check_footer(&mut &bytes[..]);
        // Field 1 (version, an i32) as an i64 takes the same bytes: fine. As a binary: refused.
        assert_eq!(footer(&[0x16, 0x02, 0x00]), Ok(()));
        let err = footer(&[0x18, 0x01, b'a', 0x00]).unwrap_err().0;
        assert!(
            err.contains("field [1] is a Thrift binary; the format has i32"),
            "{err}"
        );
        // Field 2 (the schema, a list of structs) holding an i32; empty, any header will do.
        let err = footer(&[0x29, 0x15, 0x02, 0x00]).unwrap_err().0;
        assert!(err.contains("field [2] is a list of Thrift i32; the format has a list of struct"));
        assert_eq!(footer(&[0x29, 0x00, 0x00]), Ok(()));
        // Down through lists and structs: row group → column chunk → metadata → statistics,
        // whose field 7 is a bool.
        let err = footer(&[0x49, 0x1c, 0x19, 0x1c, 0x3c, 0xcc, 0x75, 0x00])
            .unwrap_err()
            .0;
        assert!(err.contains("field [4, 1, 3, 12, 7] is a Thrift i32; the format has bool"));
        // Fields the format does not have may be of any type.
        assert_eq!(footer(&[0xf8, 0x01, b'a', 0x00]), Ok(()));
    }

    #[test]
    fn a_dictionary_page_holds_at_most_a_value_per_4_bytes() {
        // { 1: 2 (dictionary page), 2: 400, 3: 400, 7: { 1: n, 2: 0 } }
        let dictionary = |n: i64| {
            let mut bytes = page_header(400, 400);
            bytes.pop();
            bytes.extend([0x4c, 0x15]);
            bytes.extend(varint_of(n));
            bytes.extend([0x15, 0x00, 0x00, 0x00]);
            check_page_header(&mut &bytes[..])
        };
        assert_eq!(dictionary(100), Ok(()));
        let err = dictionary(101).unwrap_err().0;
        assert!(
            err.contains("400 uncompressed bytes declares 101 values"),
            "{err}"
        );
        assert!(dictionary(i32::MAX.into()).is_err());
        // CI's fuzzing: a varint past i32 that the decoder truncates to 2,013,265,920 values.
        let err = dictionary(-2_281_701_376).unwrap_err().0;
        assert!(err.contains("declares 2013265920 values"), "{err}");
    }

    #[test]
    fn integers_are_read_at_the_width_the_format_declares() {
        assert_eq!(as_read(Some(I32), -2_281_701_376), 2_013_265_920);
        assert_eq!(as_read(Some(I32), 400), 400);
        assert_eq!(as_read(Some(I16), 70_000), 4_464);
        assert_eq!(as_read(Some(I64), -2_281_701_376), -2_281_701_376);
        assert_eq!(as_read(None, 1 << 40), 1 << 40);
    }

    #[test]
    fn a_stream_is_checked_like_a_slice() {
        let mut stream = Stream(EVERY_TYPE);
        assert_eq!(check_struct(&mut stream), Ok(()));
        let mut cut = Stream(&EVERY_TYPE[..20]);
        assert!(check_struct(&mut cut).is_err());
    }

    #[test]
    fn reading_at_the_end_is_an_error_and_before_it_is_not() {
        let mut r = EndIsError(&b"abc"[..]);
        let mut buf = [0u8; 2];
        assert_eq!(r.read(&mut buf).unwrap(), 2);
        assert_eq!(r.read(&mut buf).unwrap(), 1);
        assert_eq!(r.read(&mut []).unwrap(), 0);
        let err = r.read(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        let skipped = io::copy(&mut EndIsError(&b"ab"[..]).take(5), &mut io::sink());
        assert_eq!(skipped.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }
}
