//! Checkpoint decoding (`elbo_worker::checkpoint::decode`: the files a resumed run reads from
//! disk and a joining worker receives from a peer through the coordinator) on arbitrary
//! `model.safetensors`, `optim.safetensors` and `state.json`: no panic, and a checkpoint that
//! decodes holds exactly one value per scalar of the model's parameters and buffers, and of
//! the parameters for each optimiser buffer. Input: the two safetensors files' lengths
//! (big-endian u16 each), the two files, then `state.json`.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use candle_core::{DType, Device, Var};
use elbo_worker::checkpoint::{decode, Files};
use elbo_worker::FlatLayout;
use libfuzzer_sys::fuzz_target;

/// A small model's layouts: two parameters and one buffer.
fn layouts() -> &'static (FlatLayout, FlatLayout) {
    static LAYOUTS: OnceLock<(FlatLayout, FlatLayout)> = OnceLock::new();
    LAYOUTS.get_or_init(|| {
        let var = |dims: &[usize]| Var::zeros(dims, DType::F32, &Device::Cpu).expect("a var");
        let params = [
            ("enc.bias".to_string(), var(&[3])),
            ("enc.weight".to_string(), var(&[3, 2])),
        ];
        let buffers = [("bn.mean".to_string(), var(&[3]))];
        (
            FlatLayout::new(params.iter().map(|(n, v)| (n, v))),
            FlatLayout::new(buffers.iter().map(|(n, v)| (n, v))),
        )
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&[m0, m1, o0, o1], rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let (model, rest) = rest.split_at(usize::from(u16::from_be_bytes([m0, m1])).min(rest.len()));
    let (optim, state) = rest.split_at(usize::from(u16::from_be_bytes([o0, o1])).min(rest.len()));
    let files = Files::from([
        ("model.safetensors".to_string(), model.to_vec()),
        ("optim.safetensors".to_string(), optim.to_vec()),
        ("state.json".to_string(), state.to_vec()),
    ]);
    let (params, buffers) = layouts();
    let Ok(checkpoint) = decode(&files, params, buffers, Path::new("fuzz")) else {
        return;
    };
    assert_eq!(
        checkpoint.params.len(),
        params.len(),
        "parameters of the wrong size"
    );
    assert_eq!(
        checkpoint.buffers.len(),
        buffers.len(),
        "buffers of the wrong size"
    );
    for (name, values) in &checkpoint.optimizer.buffers {
        assert_eq!(
            values.len(),
            params.len(),
            "optimiser buffer {name} of the wrong size"
        );
    }
});
