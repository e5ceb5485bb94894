//! A fused dense layer `y = x·Wᵀ + b`, optionally followed by ReLU, as one candle op with a
//! hand-written backward: on CPU the forward is one gemm writing over the broadcast bias with
//! the ReLU applied in place, and the backward is exactly `dX = g·W` (only when `x` needs a
//! gradient — never for data), `dW = gᵀ·x` and `db = Σ g`, with `g = dY·[y > 0]` fused. This
//! replaces candle's chain of transpose, matmul, broadcast-add and ReLU (and their backward
//! passes, which always compute the gradient of the input too). Other devices use that chain.
//!
//! A decoder's last layer can also end in the Bernoulli likelihood: the op then returns each
//! row's NLL, and its backward starts from `g = dNLL·(σ(y) − x)` computed in place over the
//! logits it kept, so the logits never become a tensor of the graph (candle would zero-fill and
//! add a gradient buffer for them, and allocate the likelihood's gradient beside it).

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use gemm::{gemm, Parallelism};

use crate::bernoulli::{self, bernoulli_nll};
use crate::cpu::{contiguous_f32 as contiguous, cpu_values, map2};

use crate::error::Result;
use crate::grad_sink::GradSink;

/// Multiply-adds below which a product runs on the calling thread: waking the pool costs more
/// than it saves for small products (measured on the 784-400-20 VAE: its 400×20 and 20×400
/// layers are ~1M multiply-adds, its 784×400 ones ~40M).
const PARALLEL_MIN_MACS: usize = 1 << 22;

fn parallelism(m: usize, n: usize, k: usize) -> Parallelism {
    match rayon::current_num_threads() {
        t if t > 1 && m * n * k >= PARALLEL_MIN_MACS => Parallelism::Rayon(t),
        _ => Parallelism::None,
    }
}

/// A row-major matrix, possibly used transposed: (data, rows, cols, transposed).
pub(crate) struct Operand<'a>(
    pub(crate) &'a [f32],
    pub(crate) usize,
    pub(crate) usize,
    pub(crate) bool,
);

impl Operand<'_> {
    /// Rows of the operand as used.
    pub(crate) fn rows(&self) -> usize {
        self.dims_strides().0 .0
    }

    /// (rows, cols) of the operand as used, and its (row, column) strides as used.
    fn dims_strides(&self) -> ((usize, usize), (isize, isize)) {
        let Operand(_, r, c, t) = *self;
        if t {
            ((c, r), (1, c as isize))
        } else {
            ((r, c), (c as isize, 1))
        }
    }
}

/// `dst (m × n) = [dst +] op(a) · op(b)`, with `dst` row-major; split across the pool when the
/// product is large.
fn matmul_into(
    dst: &mut [f32],
    accumulate: bool,
    a: Operand<'_>,
    b: Operand<'_>,
) -> candle_core::Result<()> {
    let (m, k) = a.dims_strides().0;
    let n = b.dims_strides().0 .1;
    matmul_on(dst, accumulate, a, b, parallelism(m, n, k))
}

/// [`matmul_into`] on the calling thread only (for products already split across the pool).
pub(crate) fn matmul_here(
    dst: &mut [f32],
    accumulate: bool,
    a: Operand<'_>,
    b: Operand<'_>,
) -> candle_core::Result<()> {
    matmul_on(dst, accumulate, a, b, Parallelism::None)
}

fn matmul_on(
    dst: &mut [f32],
    accumulate: bool,
    a: Operand<'_>,
    b: Operand<'_>,
    parallelism: Parallelism,
) -> candle_core::Result<()> {
    let ((m, k), (a_rs, a_cs)) = a.dims_strides();
    let ((k2, n), (b_rs, b_cs)) = b.dims_strides();
    if k != k2 || dst.len() != m * n || a.0.len() != a.1 * a.2 || b.0.len() != b.1 * b.2 {
        candle_core::bail!(
            "matmul: a {m}×{k} by {k2}×{n} product into {} values",
            dst.len()
        );
    }
    // SAFETY: the checks above keep every index gemm computes from these sizes and strides
    // inside the three slices, and `dst` does not alias `a` or `b`.
    unsafe {
        gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.0.as_ptr(),
            a_cs,
            a_rs,
            b.0.as_ptr(),
            b_cs,
            b_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

/// What the op applies to the product `y = x·Wᵀ + b`.
enum Epilogue {
    None,
    Relu,
    /// Each row's Bernoulli NLL of `target` under `y` as logits; the logits are kept for the
    /// backward pass.
    BernoulliNll {
        target: Tensor,
        logits: Mutex<Option<Vec<f32>>>,
    },
}

struct DenseOp {
    epilogue: Epilogue,
    /// Where the weight and bias gradients go when the sink is enabled.
    sink: Option<SinkSlots>,
}

/// A dense layer's slots in a gradient sink: the sink and the weight and bias names, built once
/// per layer (cloning is a few reference-count increments, no allocation per call). A layer
/// without a bias parameter (batch norm's β stands for it) has a weight slot only.
#[derive(Debug, Clone)]
pub(crate) struct SinkSlots {
    sink: Arc<GradSink>,
    weight: Arc<str>,
    bias: Option<Arc<str>>,
}

impl SinkSlots {
    /// Slots `{layer}.weight` and `{layer}.bias` of `sink`.
    pub(crate) fn new(sink: Arc<GradSink>, layer: &str) -> Self {
        SinkSlots {
            sink,
            weight: format!("{layer}.weight").into(),
            bias: Some(format!("{layer}.bias").into()),
        }
    }

    /// Slot `{layer}.weight` of `sink` alone, for a layer whose bias is a constant.
    pub(crate) fn weight_only(sink: Arc<GradSink>, layer: &str) -> Self {
        SinkSlots {
            sink,
            weight: format!("{layer}.weight").into(),
            bias: None,
        }
    }

    /// Adds computed weight and bias gradients into their slots (or writes them, the first
    /// time in a step); false when the sink is off.
    pub(crate) fn deposit(&self, dw: &[f32], db: &[f32]) -> candle_core::Result<bool> {
        if !self.sink.enabled() {
            return Ok(false);
        }
        fn put(src: &[f32]) -> impl FnOnce(&mut [f32], bool) -> bool + '_ {
            move |dst, accumulate| {
                if dst.len() != src.len() {
                    return false;
                }
                if accumulate {
                    dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
                } else {
                    dst.copy_from_slice(src);
                }
                true
            }
        }
        let weight = self.sink.deposit(&self.weight, put(dw));
        let bias = match &self.bias {
            Some(name) => self.sink.deposit(name, put(db)),
            None => Some(true),
        };
        match (weight, bias) {
            (Some(true), Some(true)) => Ok(true),
            _ => candle_core::bail!(
                "{} or its bias has no slot of its size in the gradient sink",
                self.weight
            ),
        }
    }
}

impl DenseOp {
    /// Writes dW = gᵀ·x and db = Σ g (when the bias is a parameter) straight into the
    /// gradient sink; false if it is off.
    fn deposit(&self, g: &Tensor, x: &Tensor) -> candle_core::Result<bool> {
        let Some(SinkSlots {
            sink,
            weight: w_name,
            bias: b_name,
        }) = self.sink.as_ref().filter(|s| s.sink.enabled())
        else {
            return Ok(false);
        };
        let (gv, xv) = (cpu_values(g)?, cpu_values(x)?);
        let ((rows, outputs), (_, inputs)) = (gv.dims, xv.dims);
        let (g, x) = (gv.values()?, xv.values()?);
        let w = sink.deposit(w_name, |dst, acc| {
            matmul_into(
                dst,
                acc,
                Operand(g, rows, outputs, true),
                Operand(x, rows, inputs, false),
            )
        });
        let b = match b_name {
            Some(b_name) => sink.deposit(b_name, |dst, acc| column_sums_into(dst, acc, g, outputs)),
            None => Some(()),
        };
        match (w, b) {
            (Some(w), Some(())) => w.map(|()| true),
            _ => candle_core::bail!("dense: {w_name} or its bias has no slot in the gradient sink"),
        }
    }
}

impl CustomOp3 for DenseOp {
    fn name(&self) -> &'static str {
        match self.epilogue {
            Epilogue::None => "dense",
            Epilogue::Relu => "dense-relu",
            Epilogue::BernoulliNll { .. } => "dense-bernoulli-nll",
        }
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, inputs) = lx.shape().dims2()?;
        let (outputs, w_in) = lw.shape().dims2()?;
        if w_in != inputs || lb.shape().dims1()? != outputs {
            candle_core::bail!(
                "dense: x {:?}, W {:?}, b {:?} do not fit",
                lx.shape(),
                lw.shape(),
                lb.shape()
            );
        }
        let (x, w, b) = (
            contiguous(sx, lx, "x")?,
            contiguous(sw, lw, "W")?,
            contiguous(sb, lb, "b")?,
        );
        let mut y = product(x, w, b, rows, inputs, outputs)?;
        match &self.epilogue {
            Epilogue::None => {}
            Epilogue::Relu => y.iter_mut().for_each(|v| *v = v.max(0.0)),
            Epilogue::BernoulliNll { target, logits } => {
                let targets = cpu_values(target)?;
                if targets.dims != (rows, outputs) {
                    candle_core::bail!(
                        "dense: targets {:?} for {rows}×{outputs} logits",
                        targets.dims
                    );
                }
                let nll = bernoulli::nll(&y, targets.values()?, outputs);
                *logits.lock().expect("dense logits") = Some(y);
                return Ok((CpuStorage::F32(nll), Shape::from(rows)));
            }
        }
        Ok((CpuStorage::F32(y), Shape::from((rows, outputs))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = match &self.epilogue {
            Epilogue::None => dy.contiguous()?,
            Epilogue::Relu => dy.contiguous()?.apply_op2_no_bwd(y, &ReluMask)?,
            Epilogue::BernoulliNll { target, logits } => {
                let kept = logits.lock().expect("dense logits").take();
                let mut g = match kept {
                    Some(logits) => logits,
                    None => self.logits_again(x, w, b)?,
                };
                let targets = cpu_values(target)?;
                let (rows, outputs) = targets.dims;
                let dy = dy.contiguous()?.to_vec1::<f32>()?;
                bernoulli::grad_in_place(&mut g, targets.values()?, &dy, outputs);
                Tensor::from_vec(g, (rows, outputs), x.device())?
            }
        };
        let dx = if x.track_op() {
            Some(g.apply_op2_no_bwd(
                w,
                &MatMul {
                    ta: false,
                    tb: false,
                },
            )?)
        } else {
            None
        };
        let x = x.contiguous()?;
        if self.deposit(&g, &x)? {
            return Ok((dx, None, None));
        }
        let dw = g.apply_op2_no_bwd(
            &x,
            &MatMul {
                ta: true,
                tb: false,
            },
        )?;
        let db = g.apply_op1_no_bwd(&ColumnSum)?;
        Ok((dx, Some(dw), Some(db)))
    }
}

impl DenseOp {
    /// The logits again, for a backward pass that finds them gone (a second one).
    fn logits_again(&self, x: &Tensor, w: &Tensor, b: &Tensor) -> candle_core::Result<Vec<f32>> {
        let (x, w) = (x.contiguous()?, w.contiguous()?);
        let (xv, wv) = (cpu_values(&x)?, cpu_values(&w)?);
        let ((rows, inputs), (outputs, _)) = (xv.dims, wv.dims);
        let b = b.to_vec1::<f32>()?;
        product(xv.values()?, wv.values()?, &b, rows, inputs, outputs)
    }
}

/// `x·Wᵀ + b` (rows × outputs): the bias broadcast, the product added over it.
fn product(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    rows: usize,
    inputs: usize,
    outputs: usize,
) -> candle_core::Result<Vec<f32>> {
    let mut y: Vec<f32> = Vec::with_capacity(rows * outputs);
    for _ in 0..rows {
        y.extend_from_slice(b);
    }
    matmul_into(
        &mut y,
        true,
        Operand(x, rows, inputs, false),
        Operand(w, outputs, inputs, true),
    )?;
    Ok(y)
}

/// `op(a) · op(b)` for row-major contiguous matrices, through [`matmul_into`].
struct MatMul {
    ta: bool,
    tb: bool,
}

impl CustomOp2 for MatMul {
    fn name(&self) -> &'static str {
        "dense-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let ((ar, ac), (br, bc)) = (l1.shape().dims2()?, l2.shape().dims2()?);
        let a = Operand(contiguous(s1, l1, "a")?, ar, ac, self.ta);
        let b = Operand(contiguous(s2, l2, "b")?, br, bc, self.tb);
        let m = a.rows();
        let n = b.dims_strides().0 .1;
        let mut dst = vec![0.0f32; m * n];
        matmul_into(&mut dst, false, a, b)?;
        Ok((CpuStorage::F32(dst), Shape::from((m, n))))
    }
}

/// Column sums of a (rows × cols) matrix: the bias gradient, accumulated row by row (candle's
/// generic reduction over dimension 0 walks with a stride and was 5 % of a training step).
struct ColumnSum;

impl CustomOp1 for ColumnSum {
    fn name(&self) -> &'static str {
        "column-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, cols) = l.shape().dims2()?;
        let mut sums = vec![0.0f32; cols];
        column_sums_into(&mut sums, true, contiguous(s, l, "g")?, cols);
        Ok((CpuStorage::F32(sums), Shape::from(cols)))
    }
}

/// Adds (or, unless `accumulate`, writes) the column sums of `g` (rows × cols) into `dst`.
fn column_sums_into(dst: &mut [f32], accumulate: bool, g: &[f32], cols: usize) {
    if !accumulate {
        dst.fill(0.0);
    }
    for row in g.chunks_exact(cols.max(1)) {
        dst.iter_mut().zip(row).for_each(|(s, v)| *s += v);
    }
}

/// `dY · [y > 0]`, the gradient through a ReLU given its output.
struct ReluMask;

impl CustomOp2 for ReluMask {
    fn name(&self) -> &'static str {
        "relu-mask"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        map2(self.name(), (s1, l1), (s2, l2), |d, y| {
            if y > 0.0 {
                d
            } else {
                0.0
            }
        })
    }
}

/// `x·Wᵀ + b`, then ReLU if `relu`: x (N, in), W (out, in), b (out,).
pub fn dense(x: &Tensor, w: &Tensor, b: &Tensor, relu: bool) -> Result<Tensor> {
    dense_with_sink(x, w, b, relu, None)
}

/// Each row's Bernoulli NLL of `target` (N, out) under the logits `x·Wᵀ + b`, the product and
/// the likelihood fused on CPU (see the module's documentation): (N,).
pub fn dense_bernoulli_nll(x: &Tensor, w: &Tensor, b: &Tensor, target: &Tensor) -> Result<Tensor> {
    dense_bernoulli_nll_with_sink(x, w, b, target, None)
}

/// [`dense_bernoulli_nll`] whose weight and bias gradients go to a gradient sink when it is
/// enabled.
pub(crate) fn dense_bernoulli_nll_with_sink(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    target: &Tensor,
    sink: Option<SinkSlots>,
) -> Result<Tensor> {
    if crate::forms::fused(x) {
        let op = DenseOp {
            epilogue: Epilogue::BernoulliNll {
                target: target.contiguous()?,
                logits: Mutex::new(None),
            },
            sink,
        };
        Ok(x.contiguous()?.apply_op3(w, b, op)?)
    } else {
        bernoulli_nll(&dense_with_sink(x, w, b, false, sink)?, target)
    }
}

/// [`dense`] whose weight and bias gradients go to a gradient sink when it is enabled.
pub(crate) fn dense_with_sink(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    relu: bool,
    sink: Option<SinkSlots>,
) -> Result<Tensor> {
    if crate::forms::fused(x) {
        let epilogue = if relu { Epilogue::Relu } else { Epilogue::None };
        Ok(x.contiguous()?
            .apply_op3(w, b, DenseOp { epilogue, sink })?)
    } else {
        let y = x.matmul(&w.t()?)?.broadcast_add(b)?;
        Ok(if relu { y.relu()? } else { y })
    }
}
