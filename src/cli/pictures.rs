//! PNG pictures of a model: sample grids, reconstructions, latent traversals, loss curves.

use std::path::Path;

use anyhow::{bail, Context};
use candle_core::{Device, Tensor};
use elbo_models::{Input, Model, Noise, Purpose};
use image::{GrayImage, ImageBuffer, Luma, Rgb, RgbImage};
use plotters::prelude::*;

/// How examples are drawn: channels and side lengths.
#[derive(Debug, Clone, Copy)]
pub struct ImageShape {
    channels: usize,
    height: usize,
    width: usize,
}

impl ImageShape {
    /// `(C, H, W)` with 1 or 3 channels, `(H, W)`, or a flat vector of a square length.
    pub fn of(shape: &[usize]) -> anyhow::Result<Self> {
        match *shape {
            [c @ (1 | 3), h, w] => Ok(ImageShape { channels: c, height: h, width: w }),
            [h, w] => Ok(ImageShape { channels: 1, height: h, width: w }),
            [n] if (n as f64).sqrt().fract() == 0.0 => {
                let s = (n as f64).sqrt() as usize;
                Ok(ImageShape { channels: 1, height: s, width: s })
            }
            _ => bail!("examples of shape {shape:?} are not images (expected (1|3, H, W), (H, W) or a square length)"),
        }
    }
}

/// Writes `rows × cols` examples (row-major in `values`, each `C·H·W` in [0, 1]) as one PNG
/// with a 1-pixel gray border around each cell.
pub fn grid(values: &[f32], shape: ImageShape, cols: usize, path: &Path) -> anyhow::Result<()> {
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
    .with_context(|| format!("cannot write {}", path.display()))
}

/// `n` samples from the prior, decoded to their means.
pub fn samples(
    model: &dyn Model,
    n: usize,
    seed: u64,
    device: &Device,
) -> anyhow::Result<Vec<f32>> {
    let ids: Vec<u64> = (0..n as u64).collect();
    let z = Noise::new(seed).rows(Purpose::Sample, 0, &ids, model.latent_dim(), device)?;
    Ok(model.decode_mean(&z)?.flatten_all()?.to_vec1()?)
}

/// Inputs above their reconstructions: `x` holds `n` examples; returns `2n` interleaved by rows
/// of `cols` (a row of inputs, then a row of their reconstructions).
pub fn reconstructions(
    model: &dyn Model,
    x: &Tensor,
    ids: &[u64],
    cols: usize,
) -> anyhow::Result<Vec<f32>> {
    let labels = vec![None; ids.len()];
    let input = Input {
        x,
        labels: &labels,
        ids,
    };
    let rec = model
        .decode_mean(&model.posterior_mean(&input)?)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let orig = x.flatten_all()?.to_vec1::<f32>()?;
    let dim = orig.len() / ids.len().max(1);
    let mut out = Vec::with_capacity(orig.len() * 2);
    for (a, b) in orig.chunks(cols * dim).zip(rec.chunks(cols * dim)) {
        out.extend_from_slice(a);
        out.extend_from_slice(b);
    }
    Ok(out)
}

/// Latent traversals around the posterior mean of one example: one row per latent dimension
/// (the first `max_dims`), `steps` values from −3 to 3.
pub fn traversals(
    model: &dyn Model,
    x: &Tensor,
    id: u64,
    max_dims: usize,
    steps: usize,
) -> anyhow::Result<Vec<f32>> {
    let input = Input {
        x,
        labels: &[None],
        ids: &[id],
    };
    let base = model
        .posterior_mean(&input)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let d = base.len();
    let mut z = Vec::new();
    for dim in 0..d.min(max_dims) {
        for s in 0..steps {
            let mut v = base.clone();
            v[dim] = -3.0 + 6.0 * s as f32 / (steps - 1).max(1) as f32;
            z.extend(v);
        }
    }
    let z = Tensor::from_vec(z, (d.min(max_dims) * steps, d), x.device())?;
    Ok(model.decode_mean(&z)?.flatten_all()?.to_vec1()?)
}

/// A line plot of `(step, value)` points (no text: the numbers are in metrics.jsonl).
pub fn curve(points: &[(f64, f64)], path: &Path) -> anyhow::Result<()> {
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
    draw().map_err(|e| anyhow::anyhow!("cannot draw {}: {e}", path.display()))
}
