//! `elbo data convert --format idx` on arbitrary images and labels files (plain or gzipped):
//! no panic, and a conversion that succeeds wrote a dataset that opens with the rows and shape
//! it reported. Input: a byte of rows per row group, a flag byte (bit 0: labels), the images
//! file's length (big-endian u16), the images file, then the labels file.
#![no_main]

mod converted;
mod scratch;

use elbo_datasets::convert::convert_idx;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&[rows, flags, hi, lo], rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let (images, labels) = rest.split_at(usize::from(u16::from_be_bytes([hi, lo])).min(rest.len()));
    let images = scratch::write("images.idx", images);
    let labels = (flags & 1 == 1).then(|| scratch::write("labels.idx", labels));
    let out = converted::output();
    let summary = convert_idx(&images, labels.as_deref(), &out, usize::from(rows).max(1));
    converted::check_output(&out, summary);
});
