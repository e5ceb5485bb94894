//! PNG pictures of a model: sample grids, reconstructions, latent traversals, the model's own
//! pictures, loss curves.

use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use elbo_datasets::{BatchStream, Dataset};
use elbo_models::{Input, Model};
use elbo_settings::Config;
use image::{GrayImage, ImageBuffer, Luma, Rgb, RgbImage};
use plotters::prelude::*;

use crate::build::binarizer;
use crate::error::{data, io, EngineError, Result};
use crate::run_dir::Metrics;

/// How examples are drawn: channels and side lengths.
#[derive(Debug, Clone, Copy)]
pub struct ImageShape {
    channels: usize,
    height: usize,
    width: usize,
}

impl ImageShape {
    /// `(C, H, W)` with 1 or 3 channels, `(H, W)`, or a flat vector of a square length.
    pub fn of(shape: &[usize]) -> Result<Self> {
        match *shape {
            [c @ (1 | 3), h, w] => Ok(ImageShape { channels: c, height: h, width: w }),
            [h, w] => Ok(ImageShape { channels: 1, height: h, width: w }),
            [n] if (n as f64).sqrt().fract() == 0.0 => {
                let s = (n as f64).sqrt() as usize;
                Ok(ImageShape { channels: 1, height: s, width: s })
            }
            _ => Err(EngineError::Invalid(format!("examples of shape {shape:?} are not images (expected (1|3, H, W), (H, W) or a square length)"))),
        }
    }
}

/// Writes `rows × cols` examples (row-major in `values`, each `C·H·W` in [0, 1]) as one PNG
/// with a 1-pixel gray border around each cell.
pub fn grid(values: &[f32], shape: ImageShape, cols: usize, path: &Path) -> Result<()> {
    let ImageShape {
        channels: c,
        height: h,
        width: w,
    } = shape;
    let n = values.len() / (c * h * w);
    let rows = n.div_ceil(cols.max(1));
    let (gw, gh) = ((cols * (w + 1) + 1) as u32, (rows * (h + 1) + 1) as u32);
    let px = |v: f32| (v.clamp(0.0, 1.0) * 255.0).round() as u8;
    let cell = |i: usize| ((i % cols) * (w + 1) + 1, (i / cols) * (h + 1) + 1);
    if c == 1 {
        let mut img: GrayImage = ImageBuffer::from_pixel(gw, gh, Luma([128]));
        for (i, ex) in values.chunks_exact(h * w).enumerate() {
            let (x0, y0) = cell(i);
            for (j, v) in ex.iter().enumerate() {
                img.put_pixel((x0 + j % w) as u32, (y0 + j / w) as u32, Luma([px(*v)]));
            }
        }
        img.save(path)
    } else {
        let mut img: RgbImage = ImageBuffer::from_pixel(gw, gh, Rgb([128, 128, 128]));
        for (i, ex) in values.chunks_exact(c * h * w).enumerate() {
            let (x0, y0) = cell(i);
            for j in 0..h * w {
                let rgb = [px(ex[j]), px(ex[h * w + j]), px(ex[2 * h * w + j])];
                img.put_pixel((x0 + j % w) as u32, (y0 + j / w) as u32, Rgb(rgb));
            }
        }
        img.save(path)
    }
    .map_err(|e| EngineError::Failed(format!("cannot write {}: {e}", path.display())))
}

/// Inputs above their reconstructions: `x` holds `n` examples; returns `2n` interleaved by rows
/// of `cols` (a row of inputs, then a row of their reconstructions).
fn reconstructions(model: &dyn Model, input: &Input<'_>, cols: usize) -> Result<Vec<f32>> {
    let rec = model.reconstruct(input)?.flatten_all()?.to_vec1::<f32>()?;
    let orig = input.x.flatten_all()?.to_vec1::<f32>()?;
    let dim = orig.len() / input.ids.len().max(1);
    let mut out = Vec::with_capacity(orig.len() * 2);
    for (a, b) in orig.chunks(cols * dim).zip(rec.chunks(cols * dim)) {
        out.extend_from_slice(a);
        out.extend_from_slice(b);
    }
    Ok(out)
}

/// samples.png, reconstructions.png, traversals.png (for models with a continuous latent), the
/// model's own pictures and loss.png under `run_dir/samples/`.
pub fn write_pictures(
    model: &dyn Model,
    test: &Arc<Dataset>,
    cfg: &Config,
    run_dir: &Path,
    device: &Device,
) -> Result<()> {
    let shape = match ImageShape::of(&test.schema().shape) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("no pictures: {e}");
            return Ok(());
        }
    };
    let dir = run_dir.join("samples");
    std::fs::create_dir_all(&dir).map_err(io(format!("cannot create {}", dir.display())))?;
    let (samples, cols) = draw(model, 64, cfg.run.seed, None, device)?;
    grid(&samples, shape, cols, &dir.join("samples.png"))?;
    let plan = test
        .plan(cfg.run.seed, 32, 32, false)
        .map_err(data("cannot plan the test data"))?;
    let epoch = plan
        .plan(0, 1, 0)
        .map_err(data("cannot plan the test data"))?;
    let first = BatchStream::new(test.clone(), epoch, binarizer(cfg), 0)
        .next()
        .ok_or_else(|| EngineError::Invalid("the test set is empty".into()))?
        .map_err(data("cannot read the test data"))?;
    let x = Tensor::from_slice(&first.x, (first.rows(), first.dim), device)?;
    let input = Input {
        x: &x,
        labels: &first.labels,
        ids: &first.ids,
    };
    let rec = reconstructions(model, &input, 8)?;
    grid(&rec, shape, 8, &dir.join("reconstructions.png"))?;
    let one = x.narrow(0, 0, 1)?;
    let single = Input {
        x: &one,
        labels: &first.labels[..1],
        ids: &first.ids[..1],
    };
    if let Some(trav) = model.traversals(&single, 10, 9)? {
        grid(
            &trav.flatten_all()?.to_vec1::<f32>()?,
            shape,
            9,
            &dir.join("traversals.png"),
        )?;
    }
    for picture in model.pictures(&input)? {
        let path = dir.join(format!("{}.png", picture.name));
        grid(&picture.values, shape, picture.cols, &path)?;
    }
    curve(&Metrics::series(run_dir, "loss"), &dir.join("loss.png"))
}

/// A line plot of `(step, value)` points (no text: the numbers are in metrics.jsonl).
pub fn curve(points: &[(f64, f64)], path: &Path) -> Result<()> {
    if points.len() < 2 {
        return Ok(());
    }
    let (x0, x1) = (
        points[0].0,
        points[points.len() - 1].0.max(points[0].0 + 1.0),
    );
    let lo = points.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let hi = points
        .iter()
        .map(|p| p.1)
        .fold(f64::NEG_INFINITY, f64::max)
        .max(lo + 1e-9);
    let root = BitMapBackend::new(path, (800, 480)).into_drawing_area();
    let draw = || -> Result<(), Box<dyn std::error::Error + '_>> {
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(20)
            .build_cartesian_2d(x0..x1, lo..hi)?;
        chart
            .plotting_area()
            .draw(&Rectangle::new([(x0, lo), (x1, hi)], BLACK.stroke_width(1)))?;
        chart.draw_series(LineSeries::new(
            points.iter().copied(),
            BLUE.stroke_width(2),
        ))?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| EngineError::Failed(format!("cannot draw {}: {e}", path.display())))
}

/// Most samples one picture holds.
pub const MAX_SAMPLES: usize = 4096;

/// Most classes a grid of class rows shows (the first ones).
const MAX_CLASS_ROWS: usize = 16;

/// About `n` samples of `model` and the columns of their grid: for a model that reads labels,
/// of class `label`, or — with none — one row per class (the first 16); else unconditioned.
fn draw(
    model: &dyn Model,
    n: usize,
    seed: u64,
    label: Option<i64>,
    device: &Device,
) -> Result<(Vec<f32>, usize)> {
    let square = (n as f64).sqrt().ceil() as usize;
    let (labels, cols) = match (model.labels().classes(), label) {
        (None, None) => (None, square),
        (None, Some(_)) => {
            return Err(EngineError::Invalid(
                "--label: this model does not read labels".into(),
            ))
        }
        (Some(classes), Some(k)) if (0..classes as i64).contains(&k) => (Some(vec![k; n]), square),
        (Some(classes), Some(k)) => {
            return Err(EngineError::Invalid(format!(
                "--label {k}: expected a class in 0..{classes}"
            )))
        }
        (Some(classes), None) => {
            let rows = classes.min(MAX_CLASS_ROWS);
            let cols = (n / rows).max(1);
            let labels = (0..rows * cols).map(|i| (i / cols) as i64).collect();
            (Some(labels), cols)
        }
    };
    let count = labels.as_ref().map_or(n, Vec::len);
    let samples = model.sample(count, seed, labels.as_deref(), device)?;
    Ok((samples.flatten_all()?.to_vec1::<f32>()?, cols))
}

/// `elbo sample`: about `n` samples of a trained run's model as one PNG grid at `path` (see
/// [`draw`] for labels); returns how many it drew.
pub fn write_samples(
    run: &crate::eval::TrainedRun,
    n: usize,
    seed: u64,
    label: Option<i64>,
    path: &Path,
    device: &Device,
) -> Result<usize> {
    if !(1..=MAX_SAMPLES).contains(&n) {
        return Err(EngineError::Invalid(format!(
            "--n {n}: expected 1 to {MAX_SAMPLES}"
        )));
    }
    let shape = ImageShape::of(&run.test.schema().shape)?;
    let (samples, cols) = draw(run.model.as_ref(), n, seed, label, device)?;
    grid(&samples, shape, cols, path)?;
    Ok(samples.len() / run.test.schema().dim.max(1))
}
