//! NumPy `.npy` arrays: images `(N, ...)` of uint8 or float, labels `(N,)` of integers (-1: an
//! unlabeled row, as scikit-learn writes them).

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use npyz::{DType, NpyFile, Order};

use super::{shape_for, ConvertSummary};
use crate::error::{DataError, Result};
use crate::format::{checked_numel, DataSchema, PixelType, MAX_EXAMPLE_VALUES};
use crate::writer::{DatasetWriter, PixelSlice, Rows, WriterSpec};

type Npy = NpyFile<BufReader<File>>;

/// Longest header accepted, NumPy's own limit (`max_header_size`, NumPy ≥ 1.24).
const MAX_HEADER: usize = 10_000;
/// Deepest nesting of brackets accepted in a header: a plain array's nests 2 deep (the dict and
/// the shape tuple), a record dtype's a few more.
const MAX_NESTING: usize = 8;

/// Checks the header's size and nesting before they reach npyz's header parser, which
/// allocates what the size field says (up to 4 GiB) and runs for a long time on deeply nested
/// brackets (found by fuzzing: a 280-byte file ran past the fuzzer's 10 s limit).
fn check_header(path: &Path) -> Result<()> {
    let mut file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut pre = Vec::with_capacity(12);
    (&mut file)
        .take(12)
        .read_to_end(&mut pre)
        .map_err(|e| DataError::io(path, e))?;
    let n = pre.len();
    if n < 10 || &pre[..6] != b"\x93NUMPY" {
        // npyz says what is wrong with the magic or the version.
        return Ok(());
    }
    let (len, start) = match pre[6] {
        1 => (usize::from(u16::from_le_bytes([pre[8], pre[9]])), 10),
        _ if n == 12 => (
            u32::from_le_bytes([pre[8], pre[9], pre[10], pre[11]]) as usize,
            12,
        ),
        _ => return Ok(()),
    };
    if len > MAX_HEADER {
        return Err(DataError::input(
            path,
            format!("header of {len} bytes; expected at most {MAX_HEADER} (NumPy's limit)"),
        ));
    }
    let mut header = vec![0u8; len];
    file.seek(SeekFrom::Start(start))
        .and_then(|_| file.read_exact(&mut header))
        .map_err(|e| DataError::input(path, format!("truncated header: {e}")))?;
    let mut depth = 0usize;
    for b in header {
        match b {
            b'(' | b'[' | b'{' => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Err(DataError::input(
                        path,
                        format!("header nests brackets more than {MAX_NESTING} deep; expected a dtype and a shape"),
                    ));
                }
            }
            b')' | b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

fn open_npy(path: &Path) -> Result<(Npy, String, Vec<usize>)> {
    check_header(path)?;
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let npy = NpyFile::new(BufReader::with_capacity(1 << 20, file))
        .map_err(|e| DataError::input(path, format!("not a readable .npy file: {e}")))?;
    let type_str = match npy.dtype() {
        DType::Plain(ts) => ts.to_string(),
        other => {
            return Err(DataError::input(
                path,
                format!("dtype {} is not a plain numeric type", other.descr()),
            ))
        }
    };
    if npy.order() == Order::Fortran && npy.shape().len() > 1 {
        return Err(DataError::input(
            path,
            "is in Fortran order; expected C order (np.ascontiguousarray)",
        ));
    }
    let shape = npy.shape().iter().map(|d| *d as usize).collect();
    Ok((npy, type_str, shape))
}

fn read_all<T: npyz::Deserialize>(npy: Npy, path: &Path) -> Result<Vec<T>> {
    npy.into_vec::<T>()
        .map_err(|e| DataError::input(path, format!("truncated or unreadable data: {e}")))
}

fn read_labels(path: &Path, rows: usize) -> Result<Vec<Option<i64>>> {
    let (npy, ts, shape) = open_npy(path)?;
    if shape != [rows] {
        return Err(DataError::input(
            path,
            format!("labels have shape {shape:?}, expected [{rows}] to match the images"),
        ));
    }
    let values: Vec<i64> = match &ts[1..] {
        "u1" => read_all::<u8>(npy, path)?
            .into_iter()
            .map(i64::from)
            .collect(),
        "i1" => read_all::<i8>(npy, path)?
            .into_iter()
            .map(i64::from)
            .collect(),
        "u2" => read_all::<u16>(npy, path)?
            .into_iter()
            .map(i64::from)
            .collect(),
        "i2" => read_all::<i16>(npy, path)?
            .into_iter()
            .map(i64::from)
            .collect(),
        "u4" => read_all::<u32>(npy, path)?
            .into_iter()
            .map(i64::from)
            .collect(),
        "i4" => read_all::<i32>(npy, path)?
            .into_iter()
            .map(i64::from)
            .collect(),
        "i8" => read_all::<i64>(npy, path)?,
        _ => {
            return Err(DataError::input(
                path,
                format!("labels have dtype {ts}, expected an integer dtype"),
            ))
        }
    };
    if let Some(i) = values.iter().position(|v| *v < -1) {
        return Err(DataError::input(
            path,
            format!(
                "label {} at index {i}; expected labels ≥ 0, or -1 for an unlabeled row",
                values[i]
            ),
        ));
    }
    // -1 marks an unlabeled row, as in scikit-learn's semi-supervised estimators.
    Ok(values.into_iter().map(|v| (v >= 0).then_some(v)).collect())
}

/// Converts an `(N, ...)` image array (and optionally `(N,)` labels) to Parquet at `out`.
/// uint8 arrays stay uint8; float arrays become float32 and must be finite.
pub fn convert_npy(
    images: &Path,
    labels: Option<&Path>,
    out: &Path,
    shape: Option<&[usize]>,
    row_group_size: usize,
) -> Result<ConvertSummary> {
    let (npy, ts, dims) = open_npy(images)?;
    if dims.len() < 2 || dims.contains(&0) {
        return Err(DataError::input(
            images,
            format!("array shape {dims:?}; expected (N, ...) with N ≥ 1 and at least one value per example"),
        ));
    }
    let rows = dims[0];
    let dim = checked_numel(&dims[1..]).ok_or_else(|| {
        DataError::input(
            images,
            format!(
                "examples of shape {:?}; expected at most {MAX_EXAMPLE_VALUES} values each",
                &dims[1..]
            ),
        )
    })?;
    let shape = match shape {
        Some(s) => shape_for(dim, Some(s), images)?,
        None => dims[1..].to_vec(),
    };
    let pixels = match &ts[1..] {
        "u1" => Pixels::Uint8(read_all::<u8>(npy, images)?),
        "f4" => Pixels::Float32(read_all::<f32>(npy, images)?),
        "f8" => Pixels::Float32(
            read_all::<f64>(npy, images)?
                .into_iter()
                .map(|v| v as f32)
                .collect(),
        ),
        _ => {
            return Err(DataError::input(
                images,
                format!("dtype {ts}, expected uint8, float32 or float64"),
            ))
        }
    };
    if let Pixels::Float32(v) = &pixels {
        if let Some(i) = v.iter().position(|f| !f.is_finite()) {
            return Err(DataError::input(
                images,
                format!(
                    "example {} holds {} at element {}; expected finite values",
                    i / dim,
                    v[i],
                    i % dim
                ),
            ));
        }
    }
    let labels = labels.map(|p| read_labels(p, rows)).transpose()?;
    let pixel = match pixels {
        Pixels::Uint8(_) => PixelType::Uint8,
        Pixels::Float32(_) => PixelType::Float32,
    };
    let spec = WriterSpec {
        schema: DataSchema {
            shape: shape.clone(),
            dim,
            pixel,
            has_label: labels.is_some(),
            has_id: true,
        },
        extra_columns: vec![],
        row_group_size,
    };
    let mut writer = DatasetWriter::create(out, spec)?;
    for start in (0..rows).step_by(row_group_size) {
        let end = (start + row_group_size).min(rows);
        let ids: Vec<u64> = (start as u64..end as u64).collect();
        let x = match &pixels {
            Pixels::Uint8(v) => PixelSlice::Uint8(&v[start * dim..end * dim]),
            Pixels::Float32(v) => PixelSlice::Float32(&v[start * dim..end * dim]),
        };
        writer.write(Rows {
            x,
            labels: labels.as_ref().map(|l| &l[start..end]),
            ids: Some(&ids),
            extra: &[],
        })?;
    }
    let rows = writer.finish()?;
    Ok(ConvertSummary {
        rows,
        shape,
        labeled: labels
            .as_ref()
            .map_or(0, |l| l.iter().filter(|v| v.is_some()).count() as u64),
    })
}

enum Pixels {
    Uint8(Vec<u8>),
    Float32(Vec<f32>),
}
