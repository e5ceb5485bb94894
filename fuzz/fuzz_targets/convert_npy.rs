//! `elbo data convert --format npy` on arbitrary image and label arrays: no panic, and a
//! conversion that succeeds wrote a dataset that opens with the rows and shape it reported.
//! Input: a byte of rows per row group, a flag byte (bit 0: labels; bit 1: `--shape` of the
//! values as 2 × rest), the images file's length (big-endian u16), the images file, then the
//! labels file.
#![no_main]

mod converted;
mod scratch;

use elbo_datasets::convert::convert_npy;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&[rows, flags, hi, lo], rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let (images, labels) = rest.split_at(usize::from(u16::from_be_bytes([hi, lo])).min(rest.len()));
    let images = scratch::write("images.npy", images);
    let labels = (flags & 1 == 1).then(|| scratch::write("labels.npy", labels));
    let shape = (flags & 2 == 2).then(|| vec![2, usize::from(flags >> 2)]);
    let out = converted::output();
    let rows = usize::from(rows).max(1);
    let summary = convert_npy(&images, labels.as_deref(), &out, shape.as_deref(), rows);
    converted::check_output(&out, summary);
});
