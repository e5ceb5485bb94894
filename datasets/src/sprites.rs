//! The built-in procedural sprites set: dSprites-like binary images of a square, an ellipse or a
//! heart at varying scale, rotation and position, with the generative factors as columns.

use std::f32::consts::TAU;
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{DataError, Result};
use crate::format::{DataSchema, PixelType};
use crate::seed::derive_seed;
use crate::writer::{DatasetWriter, PixelSlice, Rows, WriterSpec, DEFAULT_ROW_GROUP_SIZE};

/// Shapes, in label order.
pub const SHAPES: [&str; 3] = ["square", "ellipse", "heart"];
/// Factor columns written beside `x` and `label`.
pub const FACTOR_COLUMNS: [&str; 4] = ["scale", "rotation", "pos_x", "pos_y"];
/// Spec string that selects the built-in set in `data.train` / `data.test`.
pub const BUILTIN_SPRITES: &str = "builtin:sprites";

const SCALES: u32 = 6;
const ROTATIONS: u32 = 40;
const POSITIONS: u32 = 32;
const SPRITES_STREAM: u64 = 5;
/// Generator version: part of the cache key, bumped whenever the images would change.
const VERSION: u32 = 1;

/// Parameters of a sprites set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpritesParams {
    /// Training images; the test split has `max(n / 10, 1)`.
    pub n: u64,
    /// Image side: 32 or 64.
    pub size: u32,
    /// Generator seed.
    pub seed: u64,
}

/// One generated example.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Factors {
    /// 0 square, 1 ellipse, 2 heart.
    pub shape: u8,
    /// Relative size in [0.5, 1].
    pub scale: f32,
    /// Rotation in radians, [0, 2π).
    pub rotation: f32,
    /// Horizontal position in [0, 1].
    pub pos_x: f32,
    /// Vertical position in [0, 1].
    pub pos_y: f32,
}

impl Factors {
    fn draw(rng: &mut ChaCha8Rng) -> Self {
        let grid = |rng: &mut ChaCha8Rng, n: u32| rng.random_range(0..n) as f32 / (n - 1) as f32;
        Factors {
            shape: rng.random_range(0..SHAPES.len() as u8),
            scale: 0.5 + 0.5 * grid(rng, SCALES),
            rotation: TAU * rng.random_range(0..ROTATIONS) as f32 / ROTATIONS as f32,
            pos_x: grid(rng, POSITIONS),
            pos_y: grid(rng, POSITIONS),
        }
    }

    fn inside(&self, u: f32, v: f32) -> bool {
        match self.shape {
            0 => u.abs() <= 0.8 && v.abs() <= 0.8,
            1 => u * u + (v / 0.55) * (v / 0.55) <= 1.0,
            _ => {
                let (x, y) = (u * 1.15, -v * 1.15 + 0.15);
                let a = x * x + y * y - 1.0;
                a * a * a - x * x * y * y * y <= 0.0
            }
        }
    }

    /// Renders the sprite into a `size × size` image of 0/255 bytes.
    pub fn render(&self, size: u32, out: &mut [u8]) {
        let s = size as f32;
        let half = 0.16 * s * self.scale;
        let margin = 0.16 * s * 1.45;
        let cx = margin + self.pos_x * (s - 2.0 * margin);
        let cy = margin + self.pos_y * (s - 2.0 * margin);
        let (sin, cos) = self.rotation.sin_cos();
        for (i, px) in out.iter_mut().enumerate() {
            let dx = (i as u32 % size) as f32 + 0.5 - cx;
            let dy = (i as u32 / size) as f32 + 0.5 - cy;
            let u = (dx * cos + dy * sin) / half;
            let v = (-dx * sin + dy * cos) / half;
            *px = if self.inside(u, v) { 255 } else { 0 };
        }
    }
}

/// The example with index `index` of split `split` (0 train, 1 test).
pub fn sprite(params: &SpritesParams, split: u64, index: u64) -> Factors {
    let mut rng =
        ChaCha8Rng::seed_from_u64(derive_seed(params.seed, &[SPRITES_STREAM, split, index]));
    Factors::draw(&mut rng)
}

fn write_split(
    params: &SpritesParams,
    split: u64,
    n: u64,
    out: &Path,
    row_group_size: usize,
) -> Result<u64> {
    let dim = (params.size * params.size) as usize;
    let spec = WriterSpec {
        schema: DataSchema {
            shape: vec![1, params.size as usize, params.size as usize],
            dim,
            pixel: PixelType::Uint8,
            has_label: true,
            has_id: true,
        },
        extra_columns: FACTOR_COLUMNS.iter().map(|c| c.to_string()).collect(),
        row_group_size,
    };
    let mut writer = DatasetWriter::create(out, spec)?;
    let mut start = 0u64;
    while start < n {
        let end = (start + row_group_size as u64).min(n);
        let count = (end - start) as usize;
        let mut pixels = vec![0u8; count * dim];
        let mut labels = Vec::with_capacity(count);
        let mut factors: [Vec<f32>; 4] = Default::default();
        for (i, img) in (start..end).zip(pixels.chunks_exact_mut(dim)) {
            let f = sprite(params, split, i);
            f.render(params.size, img);
            labels.push(Some(i64::from(f.shape)));
            for (col, v) in factors
                .iter_mut()
                .zip([f.scale, f.rotation, f.pos_x, f.pos_y])
            {
                col.push(v);
            }
        }
        let ids: Vec<u64> = (start..end).collect();
        let extra: Vec<&[f32]> = factors.iter().map(Vec::as_slice).collect();
        writer.write(Rows {
            x: PixelSlice::Uint8(&pixels),
            labels: Some(&labels),
            ids: Some(&ids),
            extra: &extra,
        })?;
        start = end;
    }
    writer.finish()
}

/// Writes `train.parquet` (n images) and `test.parquet` (max(n/10, 1) images) into `dir`.
pub fn make_sprites(
    dir: &Path,
    params: &SpritesParams,
    row_group_size: usize,
) -> Result<(u64, u64)> {
    if ![32, 64].contains(&params.size) {
        return Err(DataError::Invalid(format!(
            "sprite size {}: expected 32 or 64",
            params.size
        )));
    }
    if params.n == 0 {
        return Err(DataError::Invalid(
            "sprite count 0: expected at least one image".into(),
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    let train = write_split(
        params,
        0,
        params.n,
        &dir.join("train.parquet"),
        row_group_size,
    )?;
    let test = write_split(
        params,
        1,
        (params.n / 10).max(1),
        &dir.join("test.parquet"),
        row_group_size,
    )?;
    Ok((train, test))
}

/// The split a dataset spec refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Training data.
    Train,
    /// Held-out data.
    Test,
}

/// Resolves a dataset spec: `builtin:sprites` becomes the cached sprites file of `split`
/// (generated on first use under `cache_root`); anything else is returned as it is.
pub fn resolve_builtin(
    spec: &str,
    split: Split,
    params: &SpritesParams,
    cache_root: &Path,
) -> Result<String> {
    if spec != BUILTIN_SPRITES {
        if let Some(name) = spec.strip_prefix("builtin:") {
            return Err(DataError::Invalid(format!(
                "unknown built-in dataset {name:?}: expected {BUILTIN_SPRITES}"
            )));
        }
        return Ok(spec.to_string());
    }
    let dir = ensure_cached(params, cache_root)?;
    let file = match split {
        Split::Train => "train.parquet",
        Split::Test => "test.parquet",
    };
    Ok(dir.join(file).to_string_lossy().into_owned())
}

/// The cache directory of a sprites set, generated atomically if absent: into a temporary
/// directory, then renamed, so a half-written set is never mistaken for a complete one and
/// concurrent first uses are safe.
pub fn ensure_cached(params: &SpritesParams, cache_root: &Path) -> Result<PathBuf> {
    let name = format!(
        "sprites-v{VERSION}-n{}-size{}-seed{}",
        params.n, params.size, params.seed
    );
    let dir = cache_root.join(name);
    if dir.join("test.parquet").is_file() {
        return Ok(dir);
    }
    std::fs::create_dir_all(cache_root).map_err(|e| DataError::io(cache_root, e))?;
    let tmp = tempfile::Builder::new()
        .prefix(".sprites-partial-")
        .permissions(crate::fsutil::shared_dir_permissions())
        .tempdir_in(cache_root)
        .map_err(|e| DataError::io(cache_root, e))?;
    make_sprites(tmp.path(), params, DEFAULT_ROW_GROUP_SIZE)?;
    let staged = tmp.keep();
    if let Err(e) = std::fs::rename(&staged, &dir) {
        let _ = std::fs::remove_dir_all(&staged);
        if !dir.join("test.parquet").is_file() {
            return Err(DataError::io(&dir, e));
        }
    }
    Ok(dir)
}
