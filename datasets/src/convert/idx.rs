//! MNIST / Fashion-MNIST IDX files (plain or gzipped).

use std::io::{ErrorKind, Read};
use std::path::Path;

use super::{open_maybe_gz, ConvertSummary};
use crate::error::{DataError, Result};
use crate::format::{checked_numel, DataSchema, PixelType, MAX_EXAMPLE_VALUES};
use crate::writer::{DatasetWriter, PixelSlice, Rows, WriterSpec};

const IMAGES_MAGIC: u32 = 0x0000_0803;
const LABELS_MAGIC: u32 = 0x0000_0801;

struct IdxFile<'a> {
    path: &'a Path,
    reader: Box<dyn Read>,
    count: usize,
    item: usize,
    dims: Vec<usize>,
}

fn open_idx<'a>(path: &'a Path, magic: u32, what: &str) -> Result<IdxFile<'a>> {
    let mut reader = open_maybe_gz(path)?;
    let ndims = (magic & 0xff) as usize;
    let mut header = vec![0u8; 4 * (1 + ndims)];
    read_exact(&mut reader, &mut header, path, "its header")?;
    let word = |i: usize| u32::from_be_bytes(header[4 * i..4 * i + 4].try_into().expect("4 bytes"));
    if word(0) != magic {
        return Err(DataError::input(
            path,
            format!(
                "magic number is 0x{:08x}, expected 0x{magic:08x} for an IDX {what} file",
                word(0)
            ),
        ));
    }
    let dims: Vec<usize> = (1..=ndims).map(|i| word(i) as usize).collect();
    if dims.iter().skip(1).any(|d| *d == 0) {
        return Err(DataError::input(
            path,
            format!("header has a zero dimension: {dims:?}"),
        ));
    }
    let item = checked_numel(&dims[1..]).ok_or_else(|| {
        DataError::input(
            path,
            format!("header declares items of {:?} values; expected at most {MAX_EXAMPLE_VALUES} per item", &dims[1..]),
        )
    })?;
    Ok(IdxFile {
        path,
        reader,
        count: dims[0],
        item,
        dims: dims[1..].to_vec(),
    })
}

fn read_exact(reader: &mut dyn Read, buf: &mut [u8], path: &Path, what: &str) -> Result<()> {
    reader.read_exact(buf).map_err(|e| {
        if e.kind() == ErrorKind::UnexpectedEof {
            DataError::input(path, format!("truncated: the file ends inside {what}"))
        } else {
            DataError::io(path, e)
        }
    })
}

impl IdxFile<'_> {
    /// Reads items `first..first + n` into `buf`. The buffer grows with the bytes that
    /// arrive, not with what the header declares: a 20-byte file declaring 2^28-value items
    /// is refused as truncated, not allocated for.
    fn read_items(&mut self, first: usize, n: usize, buf: &mut Vec<u8>) -> Result<()> {
        let want = n.checked_mul(self.item).ok_or_else(|| {
            DataError::input(self.path, "items too large to read in one row group")
        })?;
        buf.clear();
        (&mut *self.reader)
            .take(want as u64)
            .read_to_end(buf)
            .map_err(|e| DataError::io(self.path, e))?;
        if buf.len() < want {
            return Err(DataError::input(
                self.path,
                format!(
                    "truncated: the file ends inside items {first}..{} of the {} its header declares",
                    first + n,
                    self.count
                ),
            ));
        }
        Ok(())
    }

    fn expect_end(&mut self) -> Result<()> {
        let mut extra = [0u8; 1];
        match self.reader.read(&mut extra) {
            Ok(0) => Ok(()),
            Ok(_) => Err(DataError::input(
                self.path,
                format!(
                    "has data after the {} items its header declares",
                    self.count
                ),
            )),
            Err(e) => Err(DataError::io(self.path, e)),
        }
    }
}

/// Converts an IDX images file (and optionally its IDX labels file) to Parquet at `out`.
pub fn convert_idx(
    images: &Path,
    labels: Option<&Path>,
    out: &Path,
    row_group_size: usize,
) -> Result<ConvertSummary> {
    let mut img = open_idx(images, IMAGES_MAGIC, "images")?;
    let mut lab = labels
        .map(|p| open_idx(p, LABELS_MAGIC, "labels"))
        .transpose()?;
    if let Some(l) = &lab {
        if l.count != img.count {
            return Err(DataError::input(
                l.path,
                format!(
                    "declares {} labels, but {} declares {} images; expected equal counts",
                    l.count,
                    images.display(),
                    img.count
                ),
            ));
        }
    }
    if img.count == 0 {
        return Err(DataError::input(
            images,
            "declares 0 images; expected at least one",
        ));
    }
    let mut shape = vec![1];
    shape.extend(&img.dims);
    let spec = WriterSpec {
        schema: DataSchema {
            dim: img.item,
            shape: shape.clone(),
            pixel: PixelType::Uint8,
            has_label: lab.is_some(),
            has_id: true,
        },
        extra_columns: vec![],
        row_group_size,
    };
    let mut writer = DatasetWriter::create(out, spec)?;
    let (mut pixels, mut raw_labels) = (Vec::new(), Vec::new());
    let mut first = 0;
    while first < img.count {
        let n = row_group_size.min(img.count - first);
        img.read_items(first, n, &mut pixels)?;
        let labels: Option<Vec<Option<i64>>> = match &mut lab {
            Some(l) => {
                l.read_items(first, n, &mut raw_labels)?;
                Some(raw_labels.iter().map(|b| Some(i64::from(*b))).collect())
            }
            None => None,
        };
        let ids: Vec<u64> = (first as u64..(first + n) as u64).collect();
        writer.write(Rows {
            x: PixelSlice::Uint8(&pixels),
            labels: labels.as_deref(),
            ids: Some(&ids),
            extra: &[],
        })?;
        first += n;
    }
    img.expect_end()?;
    if let Some(l) = &mut lab {
        l.expect_end()?;
    }
    let rows = writer.finish()?;
    Ok(ConvertSummary {
        rows,
        shape,
        labeled: if labels.is_some() { rows } else { 0 },
    })
}
