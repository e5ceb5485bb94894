//! `elbo data convert --format csv` on arbitrary text and options: no panic, and a conversion
//! that succeeds wrote a dataset that opens with the rows and shape it reported. Input: a byte
//! of rows per row group, an options byte (bits 0–1: header auto/yes/no; bits 2–3: label
//! column none/`label`/`0`/`x`; bit 4: float32 pixels; bit 5: `--shape` 2 × rest), then the
//! text.
#![no_main]

mod converted;
mod scratch;

use elbo_datasets::convert::{convert_csv, CsvHeader, CsvOptions};
use elbo_datasets::PixelType;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&[rows, options], text)) = data.split_first_chunk::<2>() else {
        return;
    };
    let path = scratch::write("data.csv", text);
    let opts = CsvOptions {
        header: match options & 3 {
            0 | 3 => CsvHeader::Auto,
            1 => CsvHeader::Yes,
            _ => CsvHeader::No,
        },
        label_column: match (options >> 2) & 3 {
            0 => None,
            1 => Some("label".into()),
            2 => Some("0".into()),
            _ => Some("x".into()),
        },
        pixel: if options & 16 == 16 {
            PixelType::Float32
        } else {
            PixelType::Uint8
        },
        shape: (options & 32 == 32).then(|| vec![2, usize::from(options >> 6)]),
        row_group_size: usize::from(rows).max(1),
    };
    let out = converted::output();
    let summary = convert_csv(&path, &out, &opts);
    converted::check_output(&out, summary);
});
