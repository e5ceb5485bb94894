//! Bad input: each case is a clear error naming the file (and row group/column where known).

mod common;

use std::path::Path;
use std::sync::Arc;

use arrow_array::types::UInt8Type;
use arrow_array::{
    ArrayRef, FixedSizeListArray, Float32Array, Int32Array, Int64Array, ListArray, RecordBatch,
    UInt8Array,
};
use arrow_schema::{DataType, Field, Schema};
use common::write_u8;
use elbo_datasets::{inspect, BatchStream, Binarize, Binarizer, DataError, Dataset};
use parquet::arrow::ArrowWriter;

fn write_raw(path: &Path, columns: Vec<(&str, ArrayRef)>, metadata: &[(&str, &str)]) {
    let fields: Vec<Field> = columns
        .iter()
        .map(|(n, a)| Field::new(*n, a.data_type().clone(), true))
        .collect();
    let meta: std::collections::HashMap<String, String> = metadata
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let schema = Arc::new(Schema::new_with_metadata(fields, meta));
    let batch = RecordBatch::try_new(
        schema.clone(),
        columns.into_iter().map(|(_, a)| a).collect(),
    )
    .unwrap();
    let mut w = ArrowWriter::try_new(std::fs::File::create(path).unwrap(), schema, None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

fn fsl_u8(rows: usize, dim: i32) -> ArrayRef {
    let values = UInt8Array::from(vec![1u8; rows * dim as usize]);
    Arc::new(
        FixedSizeListArray::try_new(
            Arc::new(Field::new("item", DataType::UInt8, true)),
            dim,
            Arc::new(values),
            None,
        )
        .unwrap(),
    )
}

fn fsl_f32(values: Vec<f32>, dim: i32) -> ArrayRef {
    Arc::new(
        FixedSizeListArray::try_new(
            Arc::new(Field::new("item", DataType::Float32, true)),
            dim,
            Arc::new(Float32Array::from(values)),
            None,
        )
        .unwrap(),
    )
}

/// Opens and reads every row group; returns the error text.
fn read_error(spec: &str) -> String {
    let result = Dataset::open(spec).and_then(|ds| inspect(&ds).map(|_| ()));
    match result {
        Ok(()) => panic!("{spec} was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_file() {
    let msg = read_error("/nonexistent/dir/x.parquet");
    assert!(msg.contains("/nonexistent/dir/x.parquet"), "{msg}");
}

#[test]
fn not_parquet() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("notes.parquet");
    std::fs::write(&p, b"hello, this is not parquet at all").unwrap();
    let msg = read_error(p.to_str().unwrap());
    assert!(
        msg.contains("notes.parquet") && msg.contains("not a readable Parquet file"),
        "{msg}"
    );
}

#[test]
fn truncated_parquet() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_u8(&dir.path().join("t.parquet"), 0, 100, 8, 10);
    let bytes = std::fs::read(&p).unwrap();
    for cut in [bytes.len() / 2, bytes.len() - 3] {
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let msg = read_error(p.to_str().unwrap());
        assert!(
            msg.contains("t.parquet") && msg.contains("not a readable Parquet file"),
            "{msg}"
        );
    }
}

#[test]
fn corrupted_row_group_names_the_row_group() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_u8(&dir.path().join("c.parquet"), 0, 100, 8, 10);
    let mut bytes = std::fs::read(&p).unwrap();
    // Overwrite data pages (after the 4-byte magic), keep the footer intact.
    for b in &mut bytes[4..200] {
        *b = 0xff;
    }
    std::fs::write(&p, &bytes).unwrap();
    let msg = read_error(p.to_str().unwrap());
    assert!(
        msg.contains("c.parquet") && msg.contains("row group"),
        "{msg}"
    );
}

#[test]
fn wrong_column_type() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("w.parquet");
    write_raw(
        &p,
        vec![("x", Arc::new(Int32Array::from(vec![1, 2, 3])))],
        &[],
    );
    let msg = read_error(p.to_str().unwrap());
    assert!(
        msg.contains("w.parquet")
            && msg.contains("column `x` has type Int32")
            && msg.contains("FixedSizeList<UInt8>"),
        "{msg}"
    );

    let p = dir.path().join("no_x.parquet");
    write_raw(&p, vec![("pixels", fsl_u8(2, 4))], &[]);
    assert!(read_error(p.to_str().unwrap()).contains("no column `x`"));

    let p = dir.path().join("label.parquet");
    write_raw(
        &p,
        vec![
            ("x", fsl_u8(2, 4)),
            ("label", Arc::new(Float32Array::from(vec![1.0, 2.0]))),
        ],
        &[],
    );
    let msg = read_error(p.to_str().unwrap());
    assert!(
        msg.contains("column `label` has type Float32, expected Int64"),
        "{msg}"
    );
}

#[test]
fn variable_length_lists() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("list.parquet");
    let lists = ListArray::from_iter_primitive::<UInt8Type, _, _>(vec![
        Some(vec![Some(1u8), Some(2)]),
        Some(vec![Some(3u8)]),
    ]);
    write_raw(&p, vec![("x", Arc::new(lists))], &[]);
    let msg = read_error(p.to_str().unwrap());
    assert!(
        msg.contains("list.parquet") && msg.contains("column `x` has type List"),
        "{msg}"
    );
}

#[test]
fn shape_metadata_must_match_list_length() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.parquet");
    write_raw(
        &p,
        vec![("x", fsl_u8(2, 784))],
        &[("elbo.shape", "1,28,27")],
    );
    let msg = read_error(p.to_str().unwrap());
    assert!(
        msg.contains("s.parquet")
            && msg.contains("1,28,27 has 756 elements")
            && msg.contains("784"),
        "{msg}"
    );
    write_raw(
        &p,
        vec![("x", fsl_u8(2, 784))],
        &[("elbo.shape", "28 by 28")],
    );
    assert!(read_error(p.to_str().unwrap()).contains("expected positive integers"));
}

#[test]
fn non_finite_values() {
    let dir = tempfile::tempdir().unwrap();
    for (name, bad) in [("nan.parquet", f32::NAN), ("inf.parquet", f32::INFINITY)] {
        let p = dir.path().join(name);
        let mut v = vec![0.5f32; 12];
        v[9] = bad;
        write_raw(&p, vec![("x", fsl_f32(v, 4))], &[]);
        let msg = read_error(p.to_str().unwrap());
        assert!(
            msg.contains(name)
                && msg.contains("row group 0")
                && msg.contains("row 2")
                && msg.contains("finite"),
            "{msg}"
        );
    }
}

#[test]
fn negative_labels() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("neg.parquet");
    write_raw(
        &p,
        vec![
            ("x", fsl_u8(3, 4)),
            (
                "label",
                Arc::new(Int64Array::from(vec![Some(1), None, Some(-2)])),
            ),
        ],
        &[],
    );
    let msg = read_error(p.to_str().unwrap());
    assert!(
        msg.contains("neg.parquet") && msg.contains("column `label`") && msg.contains("-2"),
        "{msg}"
    );
    // The stream reports it too (training must not silently use it).
    let ds = std::sync::Arc::new(Dataset::open(p.to_str().unwrap()).unwrap());
    let plan = ds.plan(0, 3, 3, true).unwrap();
    let mut s = BatchStream::new(
        ds.clone(),
        plan.plan(0, 1, 0).unwrap(),
        Binarizer::new(Binarize::None, 0),
        1,
    );
    assert!(matches!(s.next(), Some(Err(DataError::Value { .. }))));
    assert!(s.next().is_none(), "a failed stream ends");
}

#[test]
fn mismatched_schemas_in_one_glob() {
    let dir = tempfile::tempdir().unwrap();
    write_u8(&dir.path().join("a.parquet"), 0, 10, 8, 5);
    write_u8(&dir.path().join("b.parquet"), 10, 10, 9, 5);
    let msg = read_error(&format!("{}/*.parquet", dir.path().display()));
    assert!(
        msg.contains("b.parquet") && msg.contains("a.parquet") && msg.contains("schema differs"),
        "{msg}"
    );
}

#[test]
fn empty_datasets() {
    let dir = tempfile::tempdir().unwrap();
    let msg = read_error(dir.path().to_str().unwrap());
    assert!(msg.contains("no *.parquet files"), "{msg}");
    let msg = read_error(&format!("{}/*.parquet", dir.path().display()));
    assert!(msg.contains("no files match"), "{msg}");
    let p = dir.path().join("zero.parquet");
    write_raw(&p, vec![("x", fsl_u8(0, 4))], &[]);
    let msg = read_error(p.to_str().unwrap());
    assert!(
        msg.contains("zero.parquet") && msg.contains("no rows"),
        "{msg}"
    );
}

#[test]
fn null_examples() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("null.parquet");
    let values = UInt8Array::from(vec![1u8; 12]);
    let nulls = arrow_buffer::NullBuffer::from(vec![true, false, true]);
    let x = FixedSizeListArray::try_new(
        Arc::new(Field::new("item", DataType::UInt8, true)),
        4,
        Arc::new(values),
        Some(nulls),
    )
    .unwrap();
    write_raw(&p, vec![("x", Arc::new(x))], &[]);
    let msg = read_error(p.to_str().unwrap());
    assert!(
        msg.contains("null.parquet")
            && msg.contains("row group 0")
            && msg.contains("null or empty example"),
        "{msg}"
    );
}

#[test]
fn overflowing_shape_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("big.parquet");
    write_raw(
        &p,
        vec![("x", fsl_u8(2, 4))],
        &[("elbo.shape", "4294967296,4294967296,4")],
    );
    let msg = read_error(p.to_str().unwrap());
    assert!(
        msg.contains("big.parquet") && msg.contains("too many elements"),
        "{msg}"
    );
}

/// Found by fuzzing (`fuzz/`, target `parquet`): footers whose compact-Thrift fields have
/// another wire type than their declaration made the Parquet decoder (57.3) unwrap a `None`
/// (apache/arrow-rs#9839; two of them, at two places), and a schema with an absurd number of
/// children made it overflow a capacity, instead of returning an error; a schema list declaring
/// billions of elements made it allocate 80 GB and abort (apache/arrow-rs#10920). Opening such
/// a file is an error naming it, not a crash (parquet 60 returns its own errors for all four;
/// the reader's guard catches the next such panic, see `error.rs`).
#[test]
fn fuzz_a_footer_that_panicked_the_parquet_decoder_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    for fixture in [
        "fuzz-thrift-bool.parquet",
        "fuzz-thrift-field.parquet",
        "fuzz-schema-capacity.parquet",
        "fuzz-schema-list-length.parquet",
    ] {
        let path = dir.path().join(format!("corrupt-{fixture}"));
        let source = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(fixture);
        std::fs::copy(source, &path).unwrap();
        let err = Dataset::open(path.to_str().unwrap()).unwrap_err();
        assert!(matches!(err, DataError::NotParquet { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("corrupt-{fixture}"))
                && msg.contains("not a readable Parquet file"),
            "{msg}"
        );
    }
}

/// Inserts `field` as the first field of the Thrift struct at `at`, whose first field must be
/// field 1 of type i32 in short form (`0x15`): that field follows in long form, so the ids
/// after it keep their deltas.
fn insert_first_field(bytes: &[u8], at: usize, field: &[u8]) -> Vec<u8> {
    assert_eq!(
        bytes[at], 0x15,
        "the struct at {at} starts with field 1, an i32"
    );
    [&bytes[..at], field, &[0x05, 0x02], &bytes[at + 1..]].concat()
}

/// The file with its first page header (at byte 4: field 1, field 2 the uncompressed size)
/// declaring `size` uncompressed bytes.
fn with_uncompressed_size(bytes: &[u8], size: u32) -> Vec<u8> {
    let varint_end = |at: usize| at + bytes[at..].iter().position(|b| b & 0x80 == 0).unwrap() + 1;
    assert_eq!(bytes[4], 0x15, "field 1 is an i32");
    let field2 = varint_end(5);
    assert_eq!(bytes[field2], 0x15, "field 2 is an i32");
    let rest = varint_end(field2 + 1);
    [
        &bytes[..=field2],
        &zigzag_varint(size.into()),
        &bytes[rest..],
    ]
    .concat()
}

/// The file with its first page header, a dictionary page's (at byte 4: fields 1 to 3, then
/// field 7's field 1 the number of values), declaring `n` values.
fn with_dictionary_values(bytes: &[u8], n: i64) -> Vec<u8> {
    let varint_end = |at: usize| at + bytes[at..].iter().position(|b| b & 0x80 == 0).unwrap() + 1;
    let mut at = 4;
    for field in 1..=3 {
        assert_eq!(bytes[at], 0x15, "field {field} is an i32");
        at = varint_end(at + 1);
    }
    assert_eq!(
        bytes[at..at + 2],
        [0x4c, 0x15],
        "field 7 is a struct whose field 1 is an i32"
    );
    let rest = varint_end(at + 2);
    [&bytes[..at + 2], &zigzag_varint(n), &bytes[rest..]].concat()
}

/// `n` as compact Thrift writes an integer: zigzag, then a varint.
fn zigzag_varint(n: i64) -> Vec<u8> {
    let mut zigzag = ((n << 1) ^ (n >> 63)) as u64;
    let mut out = Vec::new();
    while zigzag >= 0x80 {
        out.push((zigzag as u8) | 0x80);
        zigzag >>= 7;
    }
    out.push(zigzag as u8);
    out
}

/// An unknown field 15 holding a list of i32::MAX elements of compact type `element`.
fn huge_list(element: u8) -> Vec<u8> {
    vec![0xf9, 0xf0 | element, 0xff, 0xff, 0xff, 0xff, 0x07]
}

/// Found by fuzzing (`fuzz/`, target `parquet`; CI's fuzz stage timed out on the first): the
/// Parquet decoder (60.1) spends time and memory a small corrupt file does not bound. A page
/// header with an unknown list of two billion bytes, running past the end of the file, made it
/// issue one empty `read` per element (0.95 s for a 2 KB file, more for longer lists); one with
/// an unknown list of two billion booleans, which it counts without reading, took 6 s to
/// decode; a footer holding one, 22 s to open; a page header declaring 2 GB uncompressed, 1.9 GB
/// of memory (release builds, medians of 3 runs); a dictionary of 2 billion values, 7.9 GB (one
/// run). Each is now refused at once, naming the file.
#[test]
fn fuzz_thrift_skips_that_cost_time_without_input_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_u8(&dir.path().join("valid.parquet"), 0, 100, 8, 10);
    let valid = std::fs::read(&p).unwrap();
    let footer_len = u32::from_le_bytes(valid[valid.len() - 8..][..4].try_into().unwrap());
    let footer_at = valid.len() - 8 - footer_len as usize;
    let footer_with = |field: &[u8]| {
        let mut bytes = insert_first_field(&valid[..valid.len() - 8], footer_at, field);
        let grown = footer_len + field.len() as u32 + 1;
        bytes.extend_from_slice(&grown.to_le_bytes());
        bytes.extend_from_slice(b"PAR1");
        bytes
    };
    let fixture = |name: &str| {
        std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures")
                .join(name),
        )
        .unwrap()
    };
    let cases = [
        (
            "page-bools",
            insert_first_field(&valid, 4, &huge_list(1)),
            "corrupt page header at byte 4: a collection of 2147483647 booleans",
        ),
        (
            "page-bytes",
            insert_first_field(&valid, 4, &huge_list(3)),
            "corrupt page header at byte 4: the input ends inside",
        ),
        (
            "footer-bools",
            footer_with(&huge_list(2)),
            "corrupt footer: a collection of 2147483647 booleans",
        ),
        // The decoder zero-filled a buffer of the declared size before decompressing.
        (
            "page-size",
            with_uncompressed_size(&valid, 1_386_564_245),
            "declares 1386564245 uncompressed bytes; expected at most 16777216",
        ),
        // A dictionary of -2,281,701,376 values (field 7's field 1), which the decoder reads
        // as an i32, 2,013,265,920, and zero-filled 8 GB for (CI's fuzzing).
        (
            "dictionary-values",
            with_dictionary_values(&valid, -2_281_701_376),
            "declares 2013265920 values; expected at most",
        ),
        // The same page header, as fuzzing found it: its footer is corrupt too, and checked first.
        (
            "found-page-size",
            fixture("fuzz-page-size.parquet"),
            "corrupt footer: field [4, 1, 3, 12, 6] is a Thrift double",
        ),
        // Field 4 of a page header (an i32 the decoder reads as one whatever its header says)
        // as a list: the decoder read on out of step and skipped a list of booleans (5 s in a
        // release build, 66 s in the fuzzer's).
        (
            "found-field-type",
            fixture("fuzz-page-header-field-type.parquet"),
            "corrupt page header at byte 36: field [4] is a Thrift list; the format has i32 there",
        ),
        // The input CI found: its footer is corrupt too, and that is what is reported now.
        (
            "found-by-ci",
            fixture("fuzz-page-header-list-at-end.parquet"),
            "corrupt footer",
        ),
    ];
    for (name, bytes, expected) in cases {
        let path = dir.path().join(format!("{name}.parquet"));
        std::fs::write(&path, bytes).unwrap();
        let msg = read_error(path.to_str().unwrap());
        assert!(
            msg.contains(&format!("{name}.parquet")) && msg.contains(expected),
            "{name}: {msg}"
        );
    }
    // The file they were made from reads.
    inspect(&Dataset::open(p.to_str().unwrap()).unwrap()).unwrap();
}
