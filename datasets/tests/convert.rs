//! Converters (IDX, CSV, NPY) and the sprites generator.

use std::io::Write;
use std::path::{Path, PathBuf};

use elbo_datasets::convert::{convert_csv, convert_idx, convert_npy, CsvHeader, CsvOptions};
use elbo_datasets::sprites::{make_sprites, resolve_builtin, sprite, Split, SpritesParams};
use elbo_datasets::{inspect, label_counts, read_chunk, Dataset, PixelType, Pixels};

fn idx_bytes(magic: u32, dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut v = magic.to_be_bytes().to_vec();
    for d in dims {
        v.extend(d.to_be_bytes());
    }
    v.extend(data);
    v
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// Files in `dir` other than the given inputs: a failed conversion must leave none.
fn outputs(dir: &Path, inputs: &[&Path]) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !inputs.contains(&p.as_path()))
        .collect()
}

fn all_rows(path: &Path) -> (Dataset, Vec<u8>, Vec<Option<i64>>) {
    let ds = Dataset::open(path.to_str().unwrap()).unwrap();
    let (mut x, mut labels) = (Vec::new(), Vec::new());
    for c in ds.chunks() {
        let d = read_chunk(&ds, c).unwrap();
        match d.pixels {
            Pixels::Uint8(v) => x.extend(v),
            Pixels::Float32(_) => panic!("expected uint8"),
        }
        labels.extend(d.labels);
    }
    (ds, x, labels)
}

#[test]
fn idx_round_trip_plain_and_gzipped() {
    let dir = tempfile::tempdir().unwrap();
    let n = 1000u32;
    let pixels: Vec<u8> = (0..n * 28 * 28).map(|i| (i % 251) as u8).collect();
    let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
    for gz in [false, true] {
        let wrap = |b: Vec<u8>| if gz { gzip(&b) } else { b };
        let img = dir.path().join(format!("img{gz}"));
        let lab = dir.path().join(format!("lab{gz}"));
        std::fs::write(&img, wrap(idx_bytes(0x803, &[n, 28, 28], &pixels))).unwrap();
        std::fs::write(&lab, wrap(idx_bytes(0x801, &[n], &labels))).unwrap();
        let out = dir.path().join(format!("out{gz}.parquet"));
        let summary = convert_idx(&img, Some(&lab), &out, 300).unwrap();
        assert_eq!((summary.rows, summary.labeled), (1000, 1000));
        let (ds, x, l) = all_rows(&out);
        assert_eq!(ds.schema().shape, [1, 28, 28]);
        assert_eq!(ds.chunks().len(), 4, "row groups of 300: 300+300+300+100");
        assert_eq!(x, pixels);
        assert_eq!(
            l,
            labels
                .iter()
                .map(|v| Some(i64::from(*v)))
                .collect::<Vec<_>>()
        );
    }
}

#[test]
fn idx_errors_leave_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img");
    let lab = dir.path().join("lab");
    let out = dir.path().join("out.parquet");
    let pixels = vec![7u8; 10 * 4];
    let check = |expect: &str| {
        let err = convert_idx(&img, Some(&lab), &out, 3)
            .unwrap_err()
            .to_string();
        assert!(err.contains(expect), "{err}");
        assert!(
            outputs(dir.path(), &[&img, &lab]).is_empty(),
            "partial output left behind"
        );
    };
    std::fs::write(&lab, idx_bytes(0x801, &[10], &[1; 10])).unwrap();
    std::fs::write(&img, idx_bytes(0x804, &[10, 2, 2], &pixels)).unwrap();
    check("magic number is 0x00000804, expected 0x00000803");
    std::fs::write(&img, idx_bytes(0x803, &[11, 2, 2], &pixels)).unwrap();
    check("declares 10 labels");
    std::fs::write(&lab, idx_bytes(0x801, &[11], &[1; 11])).unwrap();
    check("truncated");
    std::fs::write(&img, idx_bytes(0x803, &[9, 2, 2], &pixels)).unwrap();
    std::fs::write(&lab, idx_bytes(0x801, &[9], &[1; 9])).unwrap();
    check("has data after the 9 items");
    std::fs::write(&img, [0u8, 0, 8]).unwrap();
    check("truncated: the file ends inside its header");
}

fn csv_opts() -> CsvOptions {
    CsvOptions {
        header: CsvHeader::Auto,
        label_column: None,
        pixel: PixelType::Uint8,
        shape: None,
        row_group_size: 2,
    }
}

#[test]
fn csv_with_header_label_and_unlabeled_rows() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("d.csv");
    std::fs::write(
        &input,
        "p0,label,p1,p2,p3\n1,3,2,3,4\n5,,6,7,8\n9,0,10,11,12\n",
    )
    .unwrap();
    let out = dir.path().join("d.parquet");
    let opts = CsvOptions {
        shape: Some(vec![2, 2]),
        ..csv_opts()
    };
    let s = convert_csv(&input, &out, &opts).unwrap();
    assert_eq!((s.rows, s.labeled), (3, 2));
    let (ds, x, labels) = all_rows(&out);
    assert_eq!(ds.schema().shape, [2, 2]);
    assert_eq!(x, (1..=12).collect::<Vec<u8>>());
    assert_eq!(labels, [Some(3), None, Some(0)]);
    let report = inspect(&ds).unwrap();
    assert_eq!((report.labeled, report.unlabeled), (2, 1));
}

#[test]
fn csv_without_a_label_column_gives_every_row_an_id_and_no_label() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("d.csv");
    std::fs::write(&input, "1,2\n3,4\n5,6\n").unwrap();
    let out = dir.path().join("d.parquet");
    let s = convert_csv(&input, &out, &csv_opts()).unwrap();
    assert_eq!((s.rows, s.labeled), (3, 0));
    let (ds, x, labels) = all_rows(&out);
    assert_eq!(x, [1, 2, 3, 4, 5, 6]);
    assert_eq!(labels, [None, None, None]);
    let ids: Vec<u64> = ds
        .chunks()
        .iter()
        .flat_map(|c| read_chunk(&ds, c).unwrap().ids)
        .collect();
    assert_eq!(ids, [0, 1, 2], "ids across row groups of 2");
    let counts = label_counts(&ds).unwrap();
    assert_eq!((counts.labeled, counts.unlabeled), (0, 3));
}

#[test]
fn csv_without_header_by_index_and_float() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("d.csv");
    std::fs::write(&input, "0.5,1,-2.5\n0.25,2,3\n").unwrap();
    let out = dir.path().join("d.parquet");
    let opts = CsvOptions {
        label_column: Some("1".into()),
        pixel: PixelType::Float32,
        ..csv_opts()
    };
    convert_csv(&input, &out, &opts).unwrap();
    let ds = Dataset::open(out.to_str().unwrap()).unwrap();
    let d = read_chunk(&ds, &ds.chunks()[0]).unwrap();
    match d.pixels {
        Pixels::Float32(v) => assert_eq!(v, [0.5, -2.5, 0.25, 3.0]),
        Pixels::Uint8(_) => panic!("expected float32"),
    }
    assert_eq!(d.labels, [Some(1), Some(2)]);
}

#[test]
fn csv_errors_name_the_line_and_leave_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("d.csv");
    let out = dir.path().join("d.parquet");
    for (text, opts, expect) in [
        (
            "label,a,b\n1,2,3\n1,2,300\n",
            csv_opts(),
            "line 3: column 2: \"300\" is not an integer in 0..=255",
        ),
        (
            "label,a,b\n1,2,3\n1,2\n",
            csv_opts(),
            "line 3: 2 fields, expected 3",
        ),
        ("label,a,b\n-1,2,3\n", csv_opts(), "line 2: label \"-1\""),
        (
            "a,b\n1,nan\n",
            CsvOptions {
                pixel: PixelType::Float32,
                ..csv_opts()
            },
            "line 2: column 1: \"nan\" is not a finite number",
        ),
        ("a,b\n", csv_opts(), "no data rows"),
        ("", csv_opts(), "is empty"),
        (
            "a,b\n1,2\n",
            CsvOptions {
                label_column: Some("y".into()),
                ..csv_opts()
            },
            "no label column \"y\"",
        ),
    ] {
        std::fs::write(&input, text).unwrap();
        let err = convert_csv(&input, &out, &opts).unwrap_err().to_string();
        assert!(err.contains("d.csv") && err.contains(expect), "{err}");
        assert!(
            outputs(dir.path(), &[&input]).is_empty(),
            "partial output left behind"
        );
    }
}

fn npy(descr: &str, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut v = b"\x93NUMPY\x01\x00".to_vec();
    v.extend((header.len() as u16).to_le_bytes());
    v.extend(header.as_bytes());
    v.extend(data);
    v
}

#[test]
fn npy_uint8_and_float64() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("x.npy");
    let lab = dir.path().join("y.npy");
    let out = dir.path().join("o.parquet");
    let pixels: Vec<u8> = (0..5 * 3 * 2).map(|i| i as u8).collect();
    std::fs::write(&img, npy("|u1", &[5, 3, 2], &pixels)).unwrap();
    let labels: Vec<u8> = [4i64, 3, 2, 1, 0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    std::fs::write(&lab, npy("<i8", &[5], &labels)).unwrap();
    let s = convert_npy(&img, Some(&lab), &out, None, 2).unwrap();
    assert_eq!((s.rows, s.shape.clone(), s.labeled), (5, vec![3, 2], 5));
    let (_, x, l) = all_rows(&out);
    assert_eq!(x, pixels);
    assert_eq!(l, [Some(4), Some(3), Some(2), Some(1), Some(0)]);

    // -1 marks an unlabeled row (scikit-learn's convention).
    let partial: Vec<u8> = [4i64, -1, 2, -1, 0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    std::fs::write(&lab, npy("<i8", &[5], &partial)).unwrap();
    let s = convert_npy(&img, Some(&lab), &out, None, 2).unwrap();
    assert_eq!(s.labeled, 3);
    assert_eq!(all_rows(&out).2, [Some(4), None, Some(2), None, Some(0)]);

    let floats: Vec<u8> = [0.5f64, 1.5, -1.0, 2.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    std::fs::write(&img, npy("<f8", &[2, 2], &floats)).unwrap();
    convert_npy(&img, None, &out, Some(&[1, 2]), 2).unwrap();
    let ds = Dataset::open(out.to_str().unwrap()).unwrap();
    assert_eq!(
        (ds.schema().pixel, ds.schema().shape.clone()),
        (PixelType::Float32, vec![1, 2])
    );
}

#[test]
fn npy_errors() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("x.npy");
    let lab = dir.path().join("y.npy");
    let out = dir.path().join("o.parquet");
    let nan: Vec<u8> = [0.5f32, f32::NAN]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    std::fs::write(&img, npy("<f4", &[1, 2], &nan)).unwrap();
    let err = convert_npy(&img, None, &out, None, 2)
        .unwrap_err()
        .to_string();
    assert!(err.contains("x.npy") && err.contains("finite"), "{err}");
    std::fs::write(&img, npy("|u1", &[2, 2], &[1, 2, 3, 4])).unwrap();
    std::fs::write(&lab, npy("|u1", &[3], &[1, 2, 3])).unwrap();
    let err = convert_npy(&img, Some(&lab), &out, None, 2)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("y.npy") && err.contains("expected [2]"),
        "{err}"
    );
    std::fs::write(&lab, npy("<i2", &[2], &[0xfe, 0xff, 1, 0])).unwrap();
    let err = convert_npy(&img, Some(&lab), &out, None, 2)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("y.npy")
            && err.contains("label -2")
            && err.contains("-1 for an unlabeled row"),
        "{err}"
    );
    std::fs::write(&img, npy("|u1", &[2, 2], &[1, 2])).unwrap();
    let err = convert_npy(&img, None, &out, None, 2)
        .unwrap_err()
        .to_string();
    assert!(err.contains("x.npy") && err.contains("truncated"), "{err}");
    std::fs::write(&img, b"not an npy file").unwrap();
    let err = convert_npy(&img, None, &out, None, 2)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("x.npy") && err.contains("not a readable .npy"),
        "{err}"
    );
    assert!(outputs(dir.path(), &[&img, &lab]).is_empty());
}

#[test]
fn sprites_are_deterministic_labeled_and_show_their_shape() {
    let dir = tempfile::tempdir().unwrap();
    let params = SpritesParams {
        n: 300,
        size: 32,
        seed: 9,
    };
    let (train, test) = make_sprites(dir.path(), &params, 128).unwrap();
    assert_eq!((train, test), (300, 30));
    let ds = Dataset::open(dir.path().join("train.parquet").to_str().unwrap()).unwrap();
    assert_eq!(ds.schema().shape, [1, 32, 32]);
    let report = inspect(&ds).unwrap();
    assert_eq!(
        report.label_histogram.keys().copied().collect::<Vec<_>>(),
        [0, 1, 2]
    );
    assert!(
        report.label_histogram.values().all(|n| *n > 60),
        "{:?}",
        report.label_histogram
    );
    let first = read_chunk(&ds, &ds.chunks()[0]).unwrap();
    let Pixels::Uint8(x) = &first.pixels else {
        panic!("uint8 expected")
    };
    for (i, img) in x.chunks(1024).enumerate() {
        assert!(img.iter().all(|v| *v == 0 || *v == 255));
        let on = img.iter().filter(|v| **v == 255).count();
        assert!((10..600).contains(&on), "image {i} has {on} pixels on");
    }
    assert_eq!(sprite(&params, 0, 17), sprite(&params, 0, 17));
    assert_ne!(sprite(&params, 0, 17), sprite(&params, 1, 17));
    // Same parameters, same bytes.
    let again = tempfile::tempdir().unwrap();
    make_sprites(again.path(), &params, 128).unwrap();
    let second = Dataset::open(again.path().join("train.parquet").to_str().unwrap()).unwrap();
    let Pixels::Uint8(y) = read_chunk(&second, &second.chunks()[0]).unwrap().pixels else {
        panic!()
    };
    assert_eq!(x, &y);
}

#[test]
fn builtin_sprites_are_generated_once_into_the_cache() {
    let cache = tempfile::tempdir().unwrap();
    let params = SpritesParams {
        n: 50,
        size: 32,
        seed: 1,
    };
    let train = resolve_builtin("builtin:sprites", Split::Train, &params, cache.path()).unwrap();
    let test = resolve_builtin("builtin:sprites", Split::Test, &params, cache.path()).unwrap();
    assert_eq!(Dataset::open(&train).unwrap().rows(), 50);
    assert_eq!(Dataset::open(&test).unwrap().rows(), 5);
    let modified = std::fs::metadata(&train).unwrap().modified().unwrap();
    resolve_builtin("builtin:sprites", Split::Train, &params, cache.path()).unwrap();
    assert_eq!(
        std::fs::metadata(&train).unwrap().modified().unwrap(),
        modified,
        "reused, not regenerated"
    );
    assert_eq!(
        resolve_builtin("data/x.parquet", Split::Train, &params, cache.path()).unwrap(),
        "data/x.parquet"
    );
    let err = resolve_builtin("builtin:mnist", Split::Train, &params, cache.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown built-in dataset \"mnist\""), "{err}");
}

#[test]
fn absurd_sizes_in_headers_are_errors_not_allocations() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img");
    let out = dir.path().join("o.parquet");
    // One image of 2^31 × 2^31 bytes: refused from the header, before any allocation.
    std::fs::write(&img, idx_bytes(0x803, &[1, 1 << 31, 1 << 31], &[])).unwrap();
    let err = convert_idx(&img, None, &out, 10).unwrap_err().to_string();
    assert!(err.contains("img") && err.contains("at most"), "{err}");
    let npy_path = dir.path().join("x.npy");
    std::fs::write(&npy_path, npy("|u1", &[1, 1 << 20, 1 << 20], &[])).unwrap();
    let err = convert_npy(&npy_path, None, &out, None, 10)
        .unwrap_err()
        .to_string();
    assert!(err.contains("x.npy") && err.contains("at most"), "{err}");
    std::fs::write(&npy_path, npy("|u1", &[2, 2], &[1, 2, 3, 4])).unwrap();
    let err = convert_npy(&npy_path, None, &out, Some(&[1 << 40, 1 << 40]), 10)
        .unwrap_err()
        .to_string();
    assert!(err.contains("--shape"), "{err}");
}

/// Found by fuzzing (`fuzz/`, target `convert_idx`): a header declaring 4,096 items of 2^24
/// values in a 20-byte file made the converter allocate a row group's 64 GiB before reading,
/// and the process abort. The buffer now grows with the bytes that arrive.
#[test]
fn fuzz_idx_declaring_more_than_it_holds_is_truncated_not_allocated() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img");
    let out = dir.path().join("o.parquet");
    std::fs::write(&img, idx_bytes(0x803, &[4096, 4096, 4096], &[1, 2, 3, 4])).unwrap();
    let err = convert_idx(&img, None, &out, 4096).unwrap_err().to_string();
    assert!(err.contains("img") && err.contains("truncated"), "{err}");
    assert!(!out.exists());
}

/// Found by fuzzing (`fuzz/`, target `convert_npy`): a 280-byte file whose header nests
/// brackets a hundred deep kept the header parser busy past the fuzzer's 10 s limit. Refused
/// before parsing.
#[test]
fn fuzz_npy_header_nested_too_deep_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested.npy");
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz-nested-header.npy");
    std::fs::copy(fixture, &path).unwrap();
    let out = dir.path().join("o.parquet");
    let err = convert_npy(&path, None, &out, None, 10)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("nested.npy") && err.contains("nests brackets"),
        "{err}"
    );
    // A header that says it is longer than NumPy allows is refused before it is read.
    let mut big = b"\x93NUMPY\x02\x00".to_vec();
    big.extend(u32::MAX.to_le_bytes());
    std::fs::write(&path, big).unwrap();
    let err = convert_npy(&path, None, &out, None, 10)
        .unwrap_err()
        .to_string();
    assert!(err.contains("at most 10000"), "{err}");
}
