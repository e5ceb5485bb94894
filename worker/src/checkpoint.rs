//! Checkpoints in the run directory:
//!
//! ```text
//! checkpoints/step-000000500/{model.safetensors, optim.safetensors, state.json, manifest.json}
//! ```
//!
//! Written into a temporary directory beside the others, every file fsynced, then renamed into
//! place and the parent fsynced: a checkpoint is either complete or absent. `manifest.json`
//! holds the size and SHA-256 of every other file; a checkpoint whose files do not match it
//! (truncated, bit-flipped, missing) is refused when read, and [`newest`] falls back to the
//! previous one with a warning. The same state gives
//! byte-identical files (tensors sorted by name, no timestamps). safetensors keeps them readable
//! from Python (`safetensors.torch.load_file`).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use elbo_datasets::Cursor;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use crate::error::{Result, WorkerError};
use crate::flat::FlatLayout;
use crate::optim::OptimizerState;

/// Version of the checkpoint layout.
pub const FORMAT: u32 = 1;
const MODEL_FILE: &str = "model.safetensors";
const OPTIM_FILE: &str = "optim.safetensors";
const STATE_FILE: &str = "state.json";
const MANIFEST_FILE: &str = "manifest.json";

/// Size and SHA-256 of each file of a checkpoint, by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Manifest {
    files: BTreeMap<String, FileDigest>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct FileDigest {
    bytes: u64,
    sha256: String,
}

fn digest(bytes: &[u8]) -> FileDigest {
    use sha2::{Digest, Sha256};
    FileDigest {
        bytes: bytes.len() as u64,
        sha256: Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    }
}

fn manifest_bytes(files: &Files) -> Result<Vec<u8>> {
    let manifest = Manifest {
        files: files
            .iter()
            .map(|(name, bytes)| (name.clone(), digest(bytes)))
            .collect(),
    };
    let mut json =
        serde_json::to_vec_pretty(&manifest).map_err(|e| WorkerError::Internal(e.to_string()))?;
    json.push(b'\n');
    Ok(json)
}

/// Everything besides tensors that a resume needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainState {
    /// Layout version.
    pub format: u32,
    /// Global steps taken.
    pub step: u64,
    /// Where the data plan stands (the next batch).
    pub cursor: Cursor,
    /// Steps skipped as non-finite so far.
    pub nonfinite_total: u64,
    /// Updates the optimiser applied.
    pub optimizer_step: u64,
    /// The run seed. Noise is derived from (seed, step, row id) and the data order from
    /// (seed, epoch), so the seed and the cursor are the whole RNG state.
    pub seed: u64,
    /// SHA-256 of the resolved config that wrote this checkpoint.
    pub config_sha256: String,
}

/// A loaded checkpoint.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// Where it was read from.
    pub dir: PathBuf,
    /// Counters, cursor, seed.
    pub state: TrainState,
    /// Flat parameters in the layout's order.
    pub params: Vec<f32>,
    /// Flat non-gradient state (the model's buffers) in their layout's order.
    pub buffers: Vec<f32>,
    /// Optimiser state.
    pub optimizer: OptimizerState,
}

/// A model's tensors as a checkpoint holds them: its parameters and its non-gradient state
/// (buffers), both in `model.safetensors` under their own names, as PyTorch's `state_dict`
/// keeps parameters and buffers together.
#[derive(Debug, Clone, Copy)]
pub struct ModelTensors<'a> {
    /// The parameters' layout.
    pub params: &'a FlatLayout,
    /// Their values.
    pub param_values: &'a [f32],
    /// The buffers' layout.
    pub buffers: &'a FlatLayout,
    /// Their values.
    pub buffer_values: &'a [f32],
}

fn step_dir_name(step: u64) -> String {
    format!("step-{step:09}")
}

/// The directory of the checkpoint of `step` steps in a run directory.
pub fn step_dir(run_dir: &Path, step: u64) -> PathBuf {
    checkpoints_dir(run_dir).join(step_dir_name(step))
}

/// The checkpoints directory of a run.
pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

fn to_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn serialize(tensors: &[(String, Vec<usize>, Vec<u8>)]) -> Result<Vec<u8>> {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            Ok((
                name.clone(),
                TensorView::new(Dtype::F32, shape.clone(), bytes)
                    .map_err(|e| WorkerError::Internal(e.to_string()))?,
            ))
        })
        .collect::<Result<_>>()?;
    safetensors::tensor::serialize(views, None).map_err(|e| WorkerError::Internal(e.to_string()))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(|e| WorkerError::checkpoint(path, e))?;
    f.write_all(bytes)
        .map_err(|e| WorkerError::checkpoint(path, e))?;
    f.sync_all().map_err(|e| WorkerError::checkpoint(path, e))
}

fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| WorkerError::checkpoint(dir, e))?;
    Ok(())
}

/// The files of a checkpoint by name, as they are written to disk or sent over the wire.
pub type Files = BTreeMap<String, Vec<u8>>;

/// The names of a checkpoint's files.
pub const FILE_NAMES: [&str; 3] = [MODEL_FILE, OPTIM_FILE, STATE_FILE];

fn slot_tensors(
    layout: &FlatLayout,
    values: &[f32],
    prefix: &str,
) -> Vec<(String, Vec<usize>, Vec<u8>)> {
    layout
        .slots()
        .iter()
        .map(|s| {
            (
                format!("{prefix}{}", s.name),
                s.var.dims().to_vec(),
                to_bytes(&values[s.offset..s.offset + s.len]),
            )
        })
        .collect()
}

/// Encodes a model's tensors, optimiser state and counters as the files of a checkpoint.
pub fn encode(
    model: &ModelTensors<'_>,
    optimizer: &OptimizerState,
    state: &TrainState,
) -> Result<Files> {
    let mut tensors = slot_tensors(model.params, model.param_values, "");
    tensors.extend(slot_tensors(model.buffers, model.buffer_values, ""));
    let optim: Vec<_> = optimizer
        .buffers
        .iter()
        .flat_map(|(buf, values)| slot_tensors(model.params, values, &format!("{buf}.")))
        .collect();
    let mut json =
        serde_json::to_vec_pretty(state).map_err(|e| WorkerError::Internal(e.to_string()))?;
    json.push(b'\n');
    Ok(Files::from([
        (MODEL_FILE.to_string(), serialize(&tensors)?),
        (OPTIM_FILE.to_string(), serialize(&optim)?),
        (STATE_FILE.to_string(), json),
    ]))
}

/// Reads the counters of a checkpoint's files (checking the file set and the format).
pub fn decode_state(files: &Files, origin: &Path) -> Result<TrainState> {
    let names: Vec<&str> = files.keys().map(String::as_str).collect();
    let mut expected = FILE_NAMES.to_vec();
    expected.sort_unstable();
    if names != expected {
        return Err(WorkerError::checkpoint(
            origin,
            format!("holds files {names:?}, expected {expected:?}"),
        ));
    }
    let state_path = origin.join(STATE_FILE);
    let state: TrainState = serde_json::from_slice(&files[STATE_FILE])
        .map_err(|e| WorkerError::checkpoint(&state_path, e))?;
    if state.format != FORMAT {
        return Err(WorkerError::checkpoint(
            &state_path,
            format!("format {} is not {FORMAT}", state.format),
        ));
    }
    Ok(state)
}

/// Writes encoded checkpoint files atomically under the step their state names, and keeps only
/// the newest `keep` (≥ 1) checkpoints. Returns the checkpoint's directory.
pub fn write(run_dir: &Path, files: &Files, keep: usize) -> Result<PathBuf> {
    let root = checkpoints_dir(run_dir);
    let state = decode_state(files, &root)?;
    std::fs::create_dir_all(&root).map_err(|e| WorkerError::checkpoint(&root, e))?;
    let target = step_dir(run_dir, state.step);
    if read(&target).is_ok_and(|old| &old == files) {
        return Ok(target);
    }
    let tmp = tempfile::Builder::new()
        .prefix(".partial-step-")
        .tempdir_in(&root)
        .map_err(|e| WorkerError::checkpoint(&root, e))?;
    for (name, bytes) in files {
        write_synced(&tmp.path().join(name), bytes)?;
    }
    write_synced(&tmp.path().join(MANIFEST_FILE), &manifest_bytes(files)?)?;
    sync_dir(tmp.path())?;
    let staged = tmp.keep();
    if target.exists() {
        std::fs::remove_dir_all(&target).map_err(|e| WorkerError::checkpoint(&target, e))?;
    }
    std::fs::rename(&staged, &target).map_err(|e| WorkerError::checkpoint(&target, e))?;
    sync_dir(&root)?;
    prune(&root, keep.max(1))?;
    Ok(target)
}

/// Checkpoint directories of a run, oldest first.
pub fn list(run_dir: &Path) -> Result<Vec<PathBuf>> {
    let root = checkpoints_dir(run_dir);
    if !root.is_dir() {
        return Ok(Vec::new());
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .map_err(|e| WorkerError::checkpoint(&root, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("step-"))
        })
        .collect();
    dirs.sort();
    Ok(dirs)
}

fn prune(root: &Path, keep: usize) -> Result<()> {
    let dirs = list(root.parent().unwrap_or(root))?;
    for old in dirs.iter().take(dirs.len().saturating_sub(keep)) {
        std::fs::remove_dir_all(old).map_err(|e| WorkerError::checkpoint(old, e))?;
    }
    Ok(())
}

fn tensor_values(
    st: &SafeTensors<'_>,
    name: &str,
    shape: &[usize],
    path: &Path,
) -> Result<Vec<f32>> {
    let view = st
        .tensor(name)
        .map_err(|_| WorkerError::checkpoint(path, format!("has no tensor {name}")))?;
    if view.dtype() != Dtype::F32 || view.shape() != shape {
        return Err(WorkerError::checkpoint(
            path,
            format!(
                "tensor {name} is {:?}{:?}, the model expects F32{shape:?}",
                view.dtype(),
                view.shape()
            ),
        ));
    }
    Ok(view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// Reads a checkpoint directory's files, checking each against the manifest.
pub fn read(dir: &Path) -> Result<Files> {
    let manifest_path = dir.join(MANIFEST_FILE);
    let manifest: Manifest = std::fs::read(&manifest_path)
        .map_err(|e| WorkerError::checkpoint(&manifest_path, e))
        .and_then(|b| {
            serde_json::from_slice(&b).map_err(|e| WorkerError::checkpoint(&manifest_path, e))
        })?;
    FILE_NAMES
        .iter()
        .map(|name| {
            let path = dir.join(name);
            let bytes = std::fs::read(&path).map_err(|e| WorkerError::checkpoint(&path, e))?;
            let want = manifest.files.get(*name).ok_or_else(|| {
                WorkerError::checkpoint(&manifest_path, format!("does not list {name}"))
            })?;
            let got = digest(&bytes);
            if &got != want {
                return Err(WorkerError::checkpoint(
                    &path,
                    format!(
                        "is corrupt: {} bytes with SHA-256 {}, the manifest says {} bytes with {}",
                        got.bytes, got.sha256, want.bytes, want.sha256
                    ),
                ));
            }
            Ok((name.to_string(), bytes))
        })
        .collect()
}

/// The newest checkpoint of a run that reads back intact, with its files. Corrupt newer ones
/// are skipped with a warning naming what is wrong; if checkpoints exist but none is intact,
/// that is an error (a run is never silently restarted from scratch).
pub fn newest(run_dir: &Path) -> Result<Option<(PathBuf, Files)>> {
    let dirs = list(run_dir)?;
    let mut problems = Vec::new();
    for dir in dirs.iter().rev() {
        match read(dir).and_then(|files| decode_state(&files, dir).map(|_| files)) {
            Ok(files) => {
                if !problems.is_empty() {
                    tracing::warn!(
                        using = %dir.display(),
                        skipped = ?problems,
                        "the newest checkpoint is corrupt; resuming from the previous intact one"
                    );
                }
                return Ok(Some((dir.clone(), files)));
            }
            Err(e) => problems.push(e.to_string()),
        }
    }
    if problems.is_empty() {
        Ok(None)
    } else {
        Err(WorkerError::checkpoint(
            checkpoints_dir(run_dir),
            format!("no intact checkpoint: {}", problems.join("; ")),
        ))
    }
}

/// Every tensor of a checkpoint directory's `model.safetensors` (parameters and buffers) by
/// name, flat, without a model to check them against (the files are checked against the
/// manifest).
pub fn model_tensors(dir: &Path) -> Result<BTreeMap<String, Vec<f32>>> {
    let files = read(dir)?;
    let path = dir.join(MODEL_FILE);
    let st = SafeTensors::deserialize(&files[MODEL_FILE])
        .map_err(|e| WorkerError::checkpoint(&path, e))?;
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = tensor_values(&st, &name, view.shape(), &path)?;
            Ok((name, values))
        })
        .collect()
}

/// Decodes checkpoint files (read from `origin`, named in errors) for a model with these
/// parameter and buffer layouts.
pub fn decode(
    files: &Files,
    params: &FlatLayout,
    buffers: &FlatLayout,
    origin: &Path,
) -> Result<Checkpoint> {
    let state = decode_state(files, origin)?;
    let model_path = origin.join(MODEL_FILE);
    let st = SafeTensors::deserialize(&files[MODEL_FILE])
        .map_err(|e| WorkerError::checkpoint(&model_path, e))?;
    let expected = params.slots().len() + buffers.slots().len();
    if st.len() != expected {
        return Err(WorkerError::checkpoint(
            &model_path,
            format!(
                "holds {} tensors, the model has {} ({} parameters, {} buffers)",
                st.len(),
                expected,
                params.slots().len(),
                buffers.slots().len()
            ),
        ));
    }
    let flat = |layout: &FlatLayout, st: &SafeTensors<'_>, prefix: &str, path: &Path| {
        let mut values = Vec::with_capacity(layout.len());
        for s in layout.slots() {
            values.extend(tensor_values(
                st,
                &format!("{prefix}{}", s.name),
                s.var.dims(),
                path,
            )?);
        }
        Ok::<_, WorkerError>(values)
    };
    let param_values = flat(params, &st, "", &model_path)?;
    let buffer_values = flat(buffers, &st, "", &model_path)?;
    let optim_path = origin.join(OPTIM_FILE);
    let st = SafeTensors::deserialize(&files[OPTIM_FILE])
        .map_err(|e| WorkerError::checkpoint(&optim_path, e))?;
    let mut names: Vec<String> = st
        .names()
        .into_iter()
        .filter_map(|n| n.split_once('.').map(|(b, _)| b.to_string()))
        .collect();
    names.sort();
    names.dedup();
    let mut optimizer = BTreeMap::new();
    for buf in names {
        let values = flat(params, &st, &format!("{buf}."), &optim_path)?;
        optimizer.insert(buf, values);
    }
    Ok(Checkpoint {
        dir: origin.to_path_buf(),
        optimizer: OptimizerState {
            step: state.optimizer_step,
            buffers: optimizer,
        },
        state,
        params: param_values,
        buffers: buffer_values,
    })
}
