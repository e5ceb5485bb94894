//! `elbo data convert --format npy` on arbitrary image and label arrays: no panic, and a
//! conversion that succeeds wrote a dataset that opens with the rows and shape it reported.
//! Input: a byte of rows per row group, a flag byte (bit 0: labels; bit 1: `--shape` of the
//! values as 2 × rest), the images file's length (big-endian u16), the images file, then the
//! labels file.
#![no_main]

mod converted;
mod scratch;
mod two_files;

use elbo_datasets::convert::convert_npy;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((input, flags)) = two_files::two_files(data, "npy") else {
        return;
    };
    let shape = (flags & 2 == 2).then(|| vec![2, usize::from(flags >> 2)]);
    let out = converted::output();
    let labels = input.labels.as_deref();
    let summary = convert_npy(&input.images, labels, &out, shape.as_deref(), input.rows);
    converted::check_output(&out, summary);
});
