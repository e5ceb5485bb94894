//! Helpers shared by the data-layer tests: small datasets written with known contents.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use elbo_datasets::{DataSchema, DatasetWriter, PixelSlice, PixelType, Rows, WriterSpec};

/// Pixel value of element `j` of the example with id `id` (distinct per id for small ids).
pub fn pixel(id: u64, j: usize) -> u8 {
    ((id * 7 + j as u64 * 3) % 256) as u8
}

/// Writes `rows` uint8 examples of `dim` values with ids `first_id..`, labels `id % 3` (every
/// fifth unlabeled), in row groups of `group` rows.
pub fn write_u8(path: &Path, first_id: u64, rows: u64, dim: usize, group: usize) -> PathBuf {
    let spec = WriterSpec {
        schema: DataSchema {
            shape: vec![dim],
            dim,
            pixel: PixelType::Uint8,
            has_label: true,
            has_id: true,
        },
        extra_columns: vec![],
        row_group_size: group,
    };
    let mut w = DatasetWriter::create(path, spec).unwrap();
    let ids: Vec<u64> = (first_id..first_id + rows).collect();
    let x: Vec<u8> = ids
        .iter()
        .flat_map(|id| (0..dim).map(move |j| pixel(*id, j)))
        .collect();
    let labels: Vec<Option<i64>> = ids
        .iter()
        .map(|id| (id % 5 != 4).then_some((*id % 3) as i64))
        .collect();
    w.write(Rows {
        x: PixelSlice::Uint8(&x),
        labels: Some(&labels),
        ids: Some(&ids),
        extra: &[],
    })
    .unwrap();
    w.finish().unwrap();
    path.to_path_buf()
}
