//! The class-conditioned rows of a first layer, `out[i] = act(y[rows[i]] + E[classes[i]])`,
//! as one candle op: `y` the layer's product over distinct input rows, `E` the class
//! embedding. On CPU one pass forward, and one pass backward that scatters the gradient into
//! `dy` and `dE` (ReLU's mask read off the output); the composed form (two gathers, an add,
//! the activation, and candle's backward of each, which allocates and zero-fills a tensor per
//! step of the chain) cost more than the products it saves. Other devices use that chain.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use crate::cpu::{contiguous_f32, cpu_values};
use crate::error::Result;

struct ClassRows {
    rows: Option<Vec<u32>>,
    classes: Vec<u32>,
    relu: bool,
}

impl ClassRows {
    /// The source row of output row `i`.
    fn row(&self, i: usize) -> usize {
        self.rows.as_ref().map_or(i, |r| r[i] as usize)
    }

    /// Checks shapes and indices: (sources, classes, width).
    fn check(&self, ly: &Layout, le: &Layout) -> candle_core::Result<(usize, usize, usize)> {
        let (sources, width) = ly.shape().dims2()?;
        let (classes, e_width) = le.shape().dims2()?;
        let n = self.classes.len();
        if e_width != width {
            candle_core::bail!(
                "class rows: y {:?} and E {:?} differ",
                ly.shape(),
                le.shape()
            );
        }
        if let Some(rows) = &self.rows {
            if rows.len() != n || rows.iter().any(|r| *r as usize >= sources) {
                candle_core::bail!("class rows: {} rows of {sources}, {n} classes", rows.len());
            }
        } else if sources != n {
            candle_core::bail!("class rows: {sources} rows, {n} classes");
        }
        if let Some(c) = self.classes.iter().find(|c| **c as usize >= classes) {
            candle_core::bail!("class rows: class {c} of {classes}");
        }
        Ok((sources, classes, width))
    }
}

impl CustomOp2 for ClassRows {
    fn name(&self) -> &'static str {
        "class-rows"
    }

    fn cpu_fwd(
        &self,
        sy: &CpuStorage,
        ly: &Layout,
        se: &CpuStorage,
        le: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, _, w) = self.check(ly, le)?;
        let (y, e) = (contiguous_f32(sy, ly, "y")?, contiguous_f32(se, le, "E")?);
        let n = self.classes.len();
        let mut out = vec![0f32; n * w];
        for (i, o) in out.chunks_exact_mut(w.max(1)).enumerate() {
            let (r, c) = (self.row(i), self.classes[i] as usize);
            let (y, e) = (&y[r * w..(r + 1) * w], &e[c * w..(c + 1) * w]);
            for ((o, y), e) in o.iter_mut().zip(y).zip(e) {
                let v = y + e;
                *o = if self.relu { v.max(0.0) } else { v };
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((n, w))))
    }

    fn bwd(
        &self,
        y: &Tensor,
        e: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (sources, w) = y.dims2()?;
        let classes = e.dim(0)?;
        let grad = grad.contiguous()?;
        let (gv, rv) = (cpu_values(&grad)?, cpu_values(res)?);
        let (n, gw) = gv.dims;
        let (g, out) = (gv.values()?, rv.values()?);
        if n != self.classes.len() || gw != w || out.len() != g.len() {
            candle_core::bail!(
                "class rows: gradient {:?} for {n} rows of {w}",
                grad.shape()
            );
        }
        // The gradient of row i before the activation, added into E's row of its class and
        // into y's row (written there when rows map one to one, as when nothing is shared).
        let relu = self.relu;
        let pre = |i: usize| {
            let (g, out) = (&g[i * w..(i + 1) * w], &out[i * w..(i + 1) * w]);
            g.iter()
                .zip(out)
                .map(move |(g, o)| if !relu || *o > 0.0 { *g } else { 0.0 })
        };
        let mut de = vec![0f32; classes * w];
        let dy = match &self.rows {
            None => {
                let mut dy = vec![0f32; n * w];
                for (i, dy) in dy.chunks_exact_mut(w.max(1)).enumerate() {
                    let c = self.classes[i] as usize;
                    let de = &mut de[c * w..(c + 1) * w];
                    for ((dy, de), g) in dy.iter_mut().zip(de.iter_mut()).zip(pre(i)) {
                        *dy = g;
                        *de += g;
                    }
                }
                dy
            }
            Some(rows) => {
                let mut dy = vec![0f32; sources * w];
                for (i, r) in rows.iter().enumerate() {
                    let (r, c) = (*r as usize, self.classes[i] as usize);
                    let (dy, de) = (&mut dy[r * w..(r + 1) * w], &mut de[c * w..(c + 1) * w]);
                    for ((dy, de), g) in dy.iter_mut().zip(de.iter_mut()).zip(pre(i)) {
                        *dy += g;
                        *de += g;
                    }
                }
                dy
            }
        };
        let device = y.device();
        Ok((
            Some(Tensor::from_vec(dy, (sources, w), device)?),
            Some(Tensor::from_vec(de, (classes, w), device)?),
        ))
    }
}

/// `act(y[rows[i]] + E[classes[i]])` for every `i` (`rows` absent: row `i` of `y`), with
/// `relu` the activation or none: `y` (S, W), `E` (K, W), both index lists u32 (N,).
pub(crate) fn class_rows(
    y: &Tensor,
    embedding: &Tensor,
    rows: Option<&Tensor>,
    classes: &Tensor,
    relu: bool,
) -> Result<Tensor> {
    if crate::forms::fused(y) {
        let op = ClassRows {
            rows: rows.map(Tensor::to_vec1::<u32>).transpose()?,
            classes: classes.to_vec1::<u32>()?,
            relu,
        };
        Ok(y.contiguous()?.apply_op2(&embedding.contiguous()?, op)?)
    } else {
        let y = match rows {
            Some(rows) => y.index_select(rows, 0)?,
            None => y.clone(),
        };
        let v = (y + embedding.index_select(classes, 0)?)?;
        Ok(if relu { v.relu()? } else { v })
    }
}
