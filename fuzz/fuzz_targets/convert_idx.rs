//! `elbo data convert --format idx` on arbitrary images and labels files (plain or gzipped):
//! no panic, and a conversion that succeeds wrote a dataset that opens with the rows and shape
//! it reported. Input: a byte of rows per row group, a flag byte (bit 0: labels), the images
//! file's length (big-endian u16), the images file, then the labels file.
#![no_main]

mod converted;
mod scratch;
mod two_files;

use elbo_datasets::convert::convert_idx;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((input, _)) = two_files::two_files(data, "idx") else {
        return;
    };
    let out = converted::output();
    let summary = convert_idx(&input.images, input.labels.as_deref(), &out, input.rows);
    converted::check_output(&out, summary);
});
