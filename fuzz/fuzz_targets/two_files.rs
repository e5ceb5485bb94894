//! The input of the targets of converters that read an images file and a labels file.

use std::path::PathBuf;

/// What a two-file converter target reads from its input: a byte of rows per row group, a
/// flag byte (bit 0: the labels file is there), the images file's length (big-endian u16), the
/// images file, then the labels file.
pub struct Input {
    /// Rows per row group, at least 1.
    pub rows: usize,
    /// The images file, written to the scratch folder.
    pub images: PathBuf,
    /// The labels file, if bit 0 of the flags says there is one.
    pub labels: Option<PathBuf>,
}

/// The two files of `data` written to the scratch folder with extension `ext`, and the flag
/// byte, or `None` when `data` is too short to say.
pub fn two_files(data: &[u8], ext: &str) -> Option<(Input, u8)> {
    let (&[rows, flags, hi, lo], rest) = data.split_first_chunk::<4>()?;
    let (images, labels) = rest.split_at(usize::from(u16::from_be_bytes([hi, lo])).min(rest.len()));
    let input = Input {
        rows: usize::from(rows).max(1),
        images: crate::scratch::write(&format!("images.{ext}"), images),
        labels: (flags & 1 == 1).then(|| crate::scratch::write(&format!("labels.{ext}"), labels)),
    };
    Some((input, flags))
}
