//! Fused 2-D convolutions, `Conv2d` and `ConvTranspose2d` with their bias and an optional ReLU,
//! as candle ops with hand-written backward passes (NCHW, square kernels, any stride, padding
//! and, for the transposed one, output padding).
//!
//! On CPU both are im2col/col2im around gemms, the images of a batch split across the pool
//! (each thread with its own column buffers, reused across its images). A convolution is
//! `y_b = W·cols(x_b) + b`, and a transposed convolution is its data gradient,
//! `y_b = col2im(Wᵀ·x_b) + b`. Small images go several to a gemm, their windows side by side
//! (256 columns or more where the thread has the images), so a 7×7 image does not pay a whole
//! gemm's packing alone. The backward passes are the same pieces the other way round —
//! `dW = Σ_b g_b·cols(x_b)ᵀ`, `dx_b = col2im(Wᵀ·g_b)` for a convolution, `dx_b = W·cols(g_b)`
//! and `dW = Σ_b x_b·cols(g_b)ᵀ` for a transposed one, `db = Σ g` — with `g = dY·[y > 0]` when
//! the ReLU is fused, the input's gradient only when the input needs one (never for data), and
//! the weight and bias gradients written into the gradient sink when it is on. Each thread sums
//! its groups' weight gradients into its own buffer; the buffers are added in thread order, so
//! a result depends on the thread count only through that order and the groups it makes. Other
//! devices, and other dtypes, compose candle's `conv2d` ([`crate::conv_gemm`]).

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use multiversion::multiversion;
use rayon::prelude::*;

use crate::cpu::{contiguous_f32 as contiguous, cpu_flat, lane_sum};
use crate::dense::{matmul_here, Operand, SinkSlots};
use crate::error::Result;

/// How a convolution moves over its image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvSpec {
    /// Step between windows.
    pub stride: usize,
    /// Zeros around the image (each side).
    pub padding: usize,
    /// Extra rows and columns at the end of a transposed convolution's output (< stride).
    pub output_padding: usize,
    /// Whether this is a transposed convolution.
    pub transposed: bool,
}

/// The geometry of one im2col: an image of `channels × height × width` read by
/// `kernel × kernel` windows at `stride` with `padding`, giving `out_h × out_w` windows. For a
/// convolution the image is its input; for a transposed convolution, its output.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    channels: usize,
    /// The kernel offsets read, bit `ki·kernel + kj` for offset (ki, kj) (`None`: all of
    /// them); a masked convolution's other weights are taken as zero.
    taps: Option<u128>,
    height: usize,
    width: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    out_h: usize,
    out_w: usize,
}

/// Where kernel offset `k` reads in the polyphase planes: the phase `r` (`(k − padding) mod
/// stride`) and the shift `a` of the plane row or column (`⌊(k − padding) / stride⌋`).
fn phase_of(k: usize, padding: usize, stride: usize) -> (usize, isize) {
    let q = k as isize - padding as isize;
    let s = stride as isize;
    (q.rem_euclid(s) as usize, q.div_euclid(s))
}

/// One side of the polyphase planes: the margin before the data, the plane's length.
fn phase_side(
    size: usize,
    out: usize,
    kernel: usize,
    padding: usize,
    stride: usize,
) -> (usize, usize) {
    let (_, first) = phase_of(0, padding, stride);
    let (_, last) = phase_of(kernel - 1, padding, stride);
    let margin = (-first).max(0) as usize;
    let data = size.div_ceil(stride) as isize;
    (
        margin,
        margin + data.max(out as isize + last).max(0) as usize,
    )
}

impl Geometry {
    /// A 1×1, stride-1, unpadded window: the columns are the image itself.
    fn pointwise(&self) -> bool {
        self.kernel == 1 && self.stride == 1 && self.padding == 0
    }

    fn windows(&self) -> usize {
        self.out_h * self.out_w
    }

    fn rows(&self) -> usize {
        self.channels * self.taps_read()
    }

    /// Kernel offsets read.
    fn taps_read(&self) -> usize {
        self.taps
            .map_or(self.kernel * self.kernel, |t| t.count_ones() as usize)
    }

    /// Whether offset `t` (`ki·kernel + kj`) is read.
    fn reads(&self, t: usize) -> bool {
        self.taps.is_none_or(|m| m & (1 << t) != 0)
    }

    /// The polyphase layout: (top margin, rows, left margin, columns) of each plane.
    fn planes(&self) -> (usize, usize, usize, usize) {
        let (s, k, p) = (self.stride, self.kernel, self.padding);
        let (mt, rows) = phase_side(self.height, self.out_h, k, p, s);
        let (ml, cols) = phase_side(self.width, self.out_w, k, p, s);
        (mt, rows, ml, cols)
    }

    /// Values in the polyphase planes of one image.
    fn phases_len(&self) -> usize {
        let (_, rows, _, cols) = self.planes();
        self.channels * self.stride * self.stride * rows * cols
    }

    /// `cols (rows × windows)`: each window's values, zero outside the image, row `r` at
    /// `cols[r·ld..]` (`ld ≥ windows`: the image's block of a group's columns). `phases` is
    /// scratch space.
    fn im2col(&self, image: &[f32], phases: &mut Vec<f32>, cols: &mut [f32], ld: usize) {
        if self.pointwise() {
            let l = self.windows();
            for (c, plane) in image.chunks_exact(l).enumerate() {
                cols[c * ld..][..l].copy_from_slice(plane);
            }
            return;
        }
        phases.clear();
        phases.resize(self.phases_len(), 0.0);
        split(self, image, phases);
        windows_from_phases(self, phases, cols, ld);
    }

    /// Adds `cols (rows × windows)`, row `r` at `cols[r·ld..]`, back into the image positions
    /// they were read from. `phases` is scratch space.
    fn col2im(&self, cols: &[f32], phases: &mut Vec<f32>, image: &mut [f32], ld: usize) {
        if self.pointwise() {
            let l = self.windows();
            for (c, plane) in image.chunks_exact_mut(l).enumerate() {
                plane
                    .iter_mut()
                    .zip(&cols[c * ld..][..l])
                    .for_each(|(v, c)| *v += c);
            }
            return;
        }
        phases.clear();
        phases.resize(self.phases_len(), 0.0);
        windows_into_phases(self, cols, phases, ld);
        merge(self, phases, image);
    }
}

// A stride-s convolution reads pixel (s·oh + ki − p, s·ow + kj − p). Splitting the image into
// s × s polyphase planes — plane (r, t) holds the pixels (s·i + r, s·j + t), with zero margins —
// turns every window row into a contiguous run of one plane: kernel offset k reads phase
// (k − p) mod s, shifted by ⌊(k − p)/s⌋. So im2col is one pass to split the image and plain
// copies after it (no per-element index arithmetic, no bounds tests: the margins are the
// padding), and col2im is plain additions and one pass to merge back.

/// The planes of `image` (zeroed before): plane `(c, r, t)` at
/// `((c·s + r)·s + t)·rows·cols`.
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma"))]
fn split(g: &Geometry, image: &[f32], phases: &mut [f32]) {
    let s = g.stride;
    let (mt, rows, ml, cols) = g.planes();
    for c in 0..g.channels {
        let plane = &image[c * g.height * g.width..][..g.height * g.width];
        for (ih, line) in plane.chunks_exact(g.width).enumerate() {
            let (r, i) = (ih % s, ih / s);
            let at = |t: usize| ((c * s + r) * s + t) * rows * cols + (i + mt) * cols + ml;
            if s == 2 && g.width % 2 == 0 {
                // Both phases of the row in one pass over it.
                let (even, odd) = phases.split_at_mut(at(1));
                let (even, odd) = (&mut even[at(0)..], &mut odd[..g.width / 2]);
                for ((e, o), pair) in even.iter_mut().zip(odd).zip(line.chunks_exact(2)) {
                    *e = pair[0];
                    *o = pair[1];
                }
                continue;
            }
            for t in 0..s.min(g.width) {
                let dst = &mut phases[at(t)..];
                for (d, v) in dst.iter_mut().zip(line[t..].iter().step_by(s)) {
                    *d = *v;
                }
            }
        }
    }
}

/// Adds the planes back into `image`: the adjoint of [`split`].
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma"))]
fn merge(g: &Geometry, phases: &[f32], image: &mut [f32]) {
    let s = g.stride;
    let (mt, rows, ml, cols) = g.planes();
    for c in 0..g.channels {
        let plane = &mut image[c * g.height * g.width..][..g.height * g.width];
        for (ih, line) in plane.chunks_exact_mut(g.width).enumerate() {
            let (r, i) = (ih % s, ih / s);
            let at = |t: usize| ((c * s + r) * s + t) * rows * cols + (i + mt) * cols + ml;
            if s == 2 && g.width % 2 == 0 {
                let (even, odd) = (&phases[at(0)..], &phases[at(1)..][..g.width / 2]);
                for ((e, o), pair) in even.iter().zip(odd).zip(line.chunks_exact_mut(2)) {
                    pair[0] += e;
                    pair[1] += o;
                }
                continue;
            }
            for t in 0..s.min(g.width) {
                let src = &phases[at(t)..];
                for (d, v) in line[t..].iter_mut().step_by(s).zip(src) {
                    *d += v;
                }
            }
        }
    }
}

/// Calls `f(plane_at, window_at)` for every window row of `g`: where its `out_w` values lie,
/// contiguous, in the polyphase planes, and where they go in the columns (`rows × windows`,
/// row `r` at `r·ld`).
#[inline(always)]
fn window_rows(g: &Geometry, ld: usize, mut f: impl FnMut(usize, usize)) {
    let (k, s) = (g.kernel, g.stride);
    let (mt, rows, ml, cols) = g.planes();
    let taps = g.taps_read();
    for c in 0..g.channels {
        let mut tap = 0;
        for ki in 0..k {
            let (r, a) = phase_of(ki, g.padding, s);
            let top = (mt as isize + a) as usize;
            for kj in 0..k {
                if !g.reads(ki * k + kj) {
                    continue;
                }
                let (t, b) = phase_of(kj, g.padding, s);
                let plane = ((c * s + r) * s + t) * rows * cols;
                let left = (ml as isize + b) as usize;
                let row = (c * taps + tap) * ld;
                tap += 1;
                for oh in 0..g.out_h {
                    f(plane + (top + oh) * cols + left, row + oh * g.out_w);
                }
            }
        }
    }
}

/// The window rows of [`Geometry::im2col`], copied out of the planes.
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma"))]
fn windows_from_phases(g: &Geometry, phases: &[f32], out: &mut [f32], ld: usize) {
    let n = g.out_w;
    // Rows of the built-in stacks' narrow widths are copied as fixed-size arrays, inline: a call
    // to `memcpy` per row of 7 to 16 values cost more than the copy (5.9% of a 28 px step).
    match n {
        7 => window_rows(g, ld, |p, w| copy_fixed::<7>(&mut out[w..], &phases[p..])),
        8 => window_rows(g, ld, |p, w| copy_fixed::<8>(&mut out[w..], &phases[p..])),
        14 => window_rows(g, ld, |p, w| copy_fixed::<14>(&mut out[w..], &phases[p..])),
        16 => window_rows(g, ld, |p, w| copy_fixed::<16>(&mut out[w..], &phases[p..])),
        _ => window_rows(g, ld, |p, w| {
            out[w..w + n].copy_from_slice(&phases[p..p + n])
        }),
    }
}

/// `dst[..N] = src[..N]` as one fixed-size array move.
#[inline(always)]
fn copy_fixed<const N: usize>(dst: &mut [f32], src: &[f32]) {
    let dst: &mut [f32; N] = (&mut dst[..N]).try_into().expect("N values");
    *dst = src[..N].try_into().expect("N values");
}

/// Adds the window rows of `cols` into the planes: the adjoint of [`windows_from_phases`].
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma"))]
fn windows_into_phases(g: &Geometry, windows: &[f32], phases: &mut [f32], ld: usize) {
    let n = g.out_w;
    match n {
        7 => window_rows(g, ld, |p, w| {
            add_fixed::<7>(&mut phases[p..], &windows[w..])
        }),
        8 => window_rows(g, ld, |p, w| {
            add_fixed::<8>(&mut phases[p..], &windows[w..])
        }),
        14 => window_rows(g, ld, |p, w| {
            add_fixed::<14>(&mut phases[p..], &windows[w..])
        }),
        16 => window_rows(g, ld, |p, w| {
            add_fixed::<16>(&mut phases[p..], &windows[w..])
        }),
        _ => window_rows(g, ld, |p, w| {
            let src = &windows[w..w + n];
            phases[p..p + n]
                .iter_mut()
                .zip(src)
                .for_each(|(d, v)| *d += v);
        }),
    }
}

/// `dst[..N] += src[..N]`, unrolled.
#[inline(always)]
fn add_fixed<const N: usize>(dst: &mut [f32], src: &[f32]) {
    let dst: &mut [f32; N] = (&mut dst[..N]).try_into().expect("N values");
    let src: &[f32; N] = src[..N].try_into().expect("N values");
    for (d, v) in dst.iter_mut().zip(src) {
        *d += v;
    }
}

/// The sizes of one op: batch, input and output channels and sides, kernel.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    batch: usize,
    /// Input (channels, height, width).
    pub(crate) input: (usize, usize, usize),
    /// Output (channels, height, width).
    pub(crate) output: (usize, usize, usize),
    kernel: usize,
}

impl Dims {
    fn in_len(&self) -> usize {
        self.input.0 * self.input.1 * self.input.2
    }

    fn out_len(&self) -> usize {
        self.output.0 * self.output.1 * self.output.2
    }
}

/// A fused convolution (see the module's documentation).
struct ConvOp {
    spec: ConvSpec,
    relu: bool,
    sink: Option<SinkSlots>,
    /// The kernel offsets read, bit `ki·k + kj` (`None`: every one).
    taps: Option<u128>,
}

/// The taps of `w` (out, in, k, k) that `taps` keeps, as the (out × in·taps) matrix the gemm
/// reads (borrowed when every tap is kept).
fn kept_taps<'a>(w: &'a [f32], g: &Geometry) -> std::borrow::Cow<'a, [f32]> {
    let k2 = g.kernel * g.kernel;
    if g.taps.is_none() {
        return w.into();
    }
    let kept: Vec<usize> = (0..k2).filter(|t| g.reads(*t)).collect();
    w.chunks_exact(k2)
        .flat_map(|taps| kept.iter().map(|t| taps[*t]))
        .collect::<Vec<f32>>()
        .into()
}

/// The full (out, in, k, k) gradient of a weight from its kept taps' gradient, zero elsewhere.
fn all_taps(dw: Vec<f32>, g: &Geometry) -> Vec<f32> {
    let (k2, t) = (g.kernel * g.kernel, g.taps_read());
    if g.taps.is_none() {
        return dw;
    }
    let kept: Vec<usize> = (0..k2).filter(|i| g.reads(*i)).collect();
    let mut full = vec![0.0f32; dw.len() / t * k2];
    for (dst, src) in full.chunks_exact_mut(k2).zip(dw.chunks_exact(t)) {
        for (i, v) in kept.iter().zip(src) {
            dst[*i] = *v;
        }
    }
    full
}

impl ConvSpec {
    /// Checks the shapes of x (B, C, H, W), W and b; the op's sizes.
    pub(crate) fn dims(&self, x: &Shape, w: &Shape, b: &Shape) -> candle_core::Result<Dims> {
        let (batch, c, h, wd) = x.dims4()?;
        let (w0, w1, k, k2) = w.dims4()?;
        let s = *self;
        let (cin, cout) = if s.transposed { (w0, w1) } else { (w1, w0) };
        let output = if s.transposed {
            let side = |n: usize| (n.max(1) - 1) * s.stride + k + s.output_padding;
            (
                side(h).checked_sub(2 * s.padding),
                side(wd).checked_sub(2 * s.padding),
            )
        } else {
            let side = |n: usize| {
                (n + 2 * s.padding)
                    .checked_sub(k)
                    .and_then(|v| v.checked_div(s.stride))
                    .map(|v| v + 1)
            };
            (side(h), side(wd))
        };
        let fits = k == k2
            && k > 0
            && s.stride > 0
            && cin == c
            && c > 0
            && cout > 0
            && h > 0
            && wd > 0
            && b.dims1()? == cout
            && (!s.transposed || s.output_padding < s.stride)
            && (s.transposed || s.output_padding == 0);
        match (fits, output) {
            (true, (Some(oh), Some(ow))) if oh > 0 && ow > 0 => Ok(Dims {
                batch,
                input: (c, h, wd),
                output: (cout, oh, ow),
                kernel: k,
            }),
            _ => candle_core::bail!(
                "conv: x {x:?}, W {w:?}, b {b:?} with {s:?} do not fit (W is (out, in, k, k) for a \
                 convolution, (in, out, k, k) transposed)"
            ),
        }
    }
}

impl ConvOp {
    /// The im2col geometry: over the input for a convolution, the output when transposed.
    fn geometry(&self, d: &Dims) -> Geometry {
        let ((c, h, w), (oh, ow)) = if self.spec.transposed {
            (d.output, (d.input.1, d.input.2))
        } else {
            (d.input, (d.output.1, d.output.2))
        };
        Geometry {
            channels: c,
            taps: self.taps,
            height: h,
            width: w,
            kernel: d.kernel,
            stride: self.spec.stride,
            padding: self.spec.padding,
            out_h: oh,
            out_w: ow,
        }
    }
}

/// Columns a gemm is given at least, where images are small: the windows of several images
/// side by side make one gemm (a 7×7 image alone gives 49, too few to amortise the packing, and
/// its weight gradient would be a rank-49 update of the whole weight per image).
const GROUP_COLUMNS: usize = 256;

/// Images per gemm for images of `l` windows: one where an image alone fills a gemm.
fn group_of(l: usize) -> usize {
    GROUP_COLUMNS.div_ceil(l.max(1))
}

/// `m` images of `channels × l` values side by side as one (channels × m·l) matrix, image
/// `i`'s channel `c` at `c·m·l + i·l`: the images themselves when `m` is 1, else written
/// into `buf`.
fn gather<'a>(images: &'a [f32], channels: usize, l: usize, buf: &'a mut Vec<f32>) -> &'a [f32] {
    let m = images.len() / (channels * l);
    if m == 1 {
        return images;
    }
    buf.resize(images.len(), 0.0);
    for (i, image) in images.chunks_exact(channels * l).enumerate() {
        for (c, plane) in image.chunks_exact(l).enumerate() {
            buf[(c * m + i) * l..][..l].copy_from_slice(plane);
        }
    }
    buf
}

/// Adds the product `a·b`, a (channels × m·l) matrix laid out as [`gather`] writes it, into
/// its `m` images of `l` values a channel: straight into the images when `m` is 1, else
/// through `side`.
fn add_product(
    images: &mut [f32],
    a: Operand<'_>,
    b: Operand<'_>,
    l: usize,
    side: &mut Vec<f32>,
) -> candle_core::Result<()> {
    let channels = a.rows();
    if images.len() == channels * l {
        return matmul_here(images, true, a, b);
    }
    side.resize(images.len(), 0.0);
    matmul_here(side, false, a, b)?;
    scatter_add(side, channels, l, images);
    Ok(())
}

/// Adds a (channels × m·l) matrix laid out as [`gather`] writes it into its `m` images.
fn scatter_add(side: &[f32], channels: usize, l: usize, images: &mut [f32]) {
    let m = images.len() / (channels * l);
    for (i, image) in images.chunks_exact_mut(channels * l).enumerate() {
        for (c, plane) in image.chunks_exact_mut(l).enumerate() {
            plane
                .iter_mut()
                .zip(&side[(c * m + i) * l..][..l])
                .for_each(|(v, s)| *v += s);
        }
    }
}

/// Images per task: the batch split evenly over the pool's threads.
fn per_task(batch: usize) -> usize {
    batch.div_ceil(rayon::current_num_threads().max(1)).max(1)
}

impl CustomOp3 for ConvOp {
    fn name(&self) -> &'static str {
        match (self.spec.transposed, self.relu) {
            (false, false) => "conv2d",
            (false, true) => "conv2d-relu",
            (true, false) => "conv-transpose2d",
            (true, true) => "conv-transpose2d-relu",
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
        let d = self.spec.dims(lx.shape(), lw.shape(), lb.shape())?;
        let (x, w, b) = (
            contiguous(sx, lx, "x")?,
            contiguous(sw, lw, "W")?,
            contiguous(sb, lb, "b")?,
        );
        let g = self.geometry(&d);
        let w = &*kept_taps(w, &g);
        let (in_len, out_len) = (d.in_len(), d.out_len());
        let plane = d.output.1 * d.output.2;
        let mut y = vec![0.0f32; d.batch * out_len];
        let (per, l) = (per_task(d.batch), g.windows());
        let group = group_of(l);
        y.par_chunks_mut(per * out_len)
            .zip(x.par_chunks(per * in_len))
            .try_for_each(|(ys, xs)| -> candle_core::Result<()> {
                let mut cols = Vec::new();
                let (mut phases, mut side) = (Vec::new(), Vec::new());
                for (ys, xs) in ys
                    .chunks_mut(group * out_len)
                    .zip(xs.chunks(group * in_len))
                {
                    let m = ys.len() / out_len;
                    cols.resize(g.rows() * m * l, 0.0);
                    for y in ys.chunks_exact_mut(out_len) {
                        for (o, bias) in y.chunks_exact_mut(plane).zip(b) {
                            o.fill(*bias);
                        }
                    }
                    if self.spec.transposed {
                        // cols (O·k·k × m·H·W) = Wᵀ·x, W being (C × O·k·k).
                        let c = d.input.0;
                        let xg = gather(xs, c, l, &mut side);
                        matmul_here(
                            &mut cols,
                            false,
                            Operand(w, c, g.rows(), true),
                            Operand(xg, c, m * l, false),
                        )?;
                        for (i, y) in ys.chunks_exact_mut(out_len).enumerate() {
                            g.col2im(&cols[i * l..], &mut phases, y, m * l);
                        }
                    } else {
                        for (i, x) in xs.chunks_exact(in_len).enumerate() {
                            g.im2col(x, &mut phases, &mut cols[i * l..], m * l);
                        }
                        add_product(
                            ys,
                            Operand(w, d.output.0, g.rows(), false),
                            Operand(&cols, g.rows(), m * l, false),
                            l,
                            &mut side,
                        )?;
                    }
                    if self.relu {
                        ys.iter_mut().for_each(|v| *v = v.max(0.0));
                    }
                }
                Ok(())
            })?;
        let shape = Shape::from((d.batch, d.output.0, d.output.1, d.output.2));
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x, w, dy) = (x.contiguous()?, w.contiguous()?, dy.contiguous()?);
        let d = self.spec.dims(x.shape(), w.shape(), b.shape())?;
        let geo = self.geometry(&d);
        let need_dx = x.track_op();
        let (xv, wv, dyv, yv) = (cpu_flat(&x)?, cpu_flat(&w)?, cpu_flat(&dy)?, cpu_flat(y)?);
        let kept = kept_taps(wv.values()?, &geo);
        let mut grads = Backward {
            op: self,
            d,
            geo,
            x: xv.values()?,
            w: &kept,
            dy: dyv.values()?,
            y: if self.relu { Some(yv.values()?) } else { None },
        }
        .run(need_dx)?;
        grads.dw = all_taps(grads.dw, &geo);
        let dx = match grads.dx {
            Some(dx) => Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            None => None,
        };
        if let Some(sink) = &self.sink {
            if sink.deposit(&grads.dw, &grads.db)? {
                return Ok((dx, None, None));
            }
        }
        Ok((
            dx,
            Some(Tensor::from_vec(grads.dw, w.shape(), w.device())?),
            Some(Tensor::from_vec(grads.db, b.shape(), b.device())?),
        ))
    }
}

/// One backward pass's inputs.
struct Backward<'a> {
    op: &'a ConvOp,
    d: Dims,
    geo: Geometry,
    x: &'a [f32],
    w: &'a [f32],
    /// The output's gradient.
    dy: &'a [f32],
    /// The output, when a ReLU is fused: the gradient passes where it is positive.
    y: Option<&'a [f32]>,
}

/// The gradients of a backward pass.
struct Grads {
    dx: Option<Vec<f32>>,
    dw: Vec<f32>,
    db: Vec<f32>,
}

impl Backward<'_> {
    fn run(&self, need_dx: bool) -> candle_core::Result<Grads> {
        let d = self.d;
        let (in_len, out_len) = (d.in_len(), d.out_len());
        let per = per_task(d.batch);
        let mut dx = if need_dx {
            vec![0.0f32; d.batch * in_len]
        } else {
            Vec::new()
        };
        let tasks = d.batch.div_ceil(per);
        let parts: Vec<Option<&mut [f32]>> = if need_dx {
            dx.chunks_mut(per * in_len).map(Some).collect()
        } else {
            (0..tasks).map(|_| None).collect()
        };
        let partials = parts
            .into_par_iter()
            .enumerate()
            .map(|(t, dx)| {
                let images = t * per..((t + 1) * per).min(d.batch);
                self.task(images, dx, in_len, out_len)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut partials = partials.into_iter();
        let (mut dw, mut db) = partials
            .next()
            .unwrap_or_else(|| (vec![0.0; self.w.len()], vec![0.0; d.output.0]));
        for (w, b) in partials {
            dw.iter_mut().zip(&w).for_each(|(a, v)| *a += v);
            db.iter_mut().zip(&b).for_each(|(a, v)| *a += v);
        }
        Ok(Grads {
            dx: need_dx.then_some(dx),
            dw,
            db,
        })
    }

    /// The weight and bias gradients of `images`, and their input gradients into `dx`.
    fn task(
        &self,
        images: std::ops::Range<usize>,
        mut dx: Option<&mut [f32]>,
        in_len: usize,
        out_len: usize,
    ) -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
        let (d, geo) = (self.d, self.geo);
        let (cout, plane) = (d.output.0, d.output.1 * d.output.2);
        let mut dw = vec![0.0f32; self.w.len()];
        let mut db = vec![0.0f32; cout];
        let (l, rows) = (geo.windows(), geo.rows());
        let group = group_of(l);
        let (mut cols, mut phases) = (Vec::new(), Vec::new());
        let (mut masked, mut side, mut side_x) = (Vec::new(), Vec::new(), Vec::new());
        let mut at = images.start;
        while at < images.end {
            let m = group.min(images.end - at);
            let span = |len: usize| at * len..(at + m) * len;
            let (x, dy) = (&self.x[span(in_len)], &self.dy[span(out_len)]);
            let g = match self.y {
                Some(y) => {
                    masked.clear();
                    masked.extend(dy.iter().zip(&y[span(out_len)]).map(|(d, y)| {
                        if *y > 0.0 {
                            *d
                        } else {
                            0.0
                        }
                    }));
                    &masked[..]
                }
                None => dy,
            };
            for image in g.chunks_exact(out_len) {
                for (s, o) in db.iter_mut().zip(image.chunks_exact(plane)) {
                    *s += lane_sum(o);
                }
            }
            let first = (at - images.start) * in_len;
            let dx = dx
                .as_deref_mut()
                .map(|dx| &mut dx[first..first + m * in_len]);
            cols.resize(rows * m * l, 0.0);
            if self.op.spec.transposed {
                // cols(g) (O·k·k × m·H·W); dx = W·cols(g), dW += x·cols(g)ᵀ, W being (C × O·k·k).
                let c = d.input.0;
                for (i, image) in g.chunks_exact(out_len).enumerate() {
                    geo.im2col(image, &mut phases, &mut cols[i * l..], m * l);
                }
                if let Some(dx) = dx {
                    add_product(
                        dx,
                        Operand(self.w, c, rows, false),
                        Operand(&cols, rows, m * l, false),
                        l,
                        &mut side,
                    )?;
                }
                matmul_here(
                    &mut dw,
                    true,
                    Operand(gather(x, c, l, &mut side_x), c, m * l, false),
                    Operand(&cols, rows, m * l, true),
                )?;
            } else {
                // dW += g·cols(x)ᵀ; dx = col2im(Wᵀ·g), W being (O × C·k·k).
                for (i, image) in x.chunks_exact(in_len).enumerate() {
                    geo.im2col(image, &mut phases, &mut cols[i * l..], m * l);
                }
                let g = gather(g, cout, l, &mut side);
                matmul_here(
                    &mut dw,
                    true,
                    Operand(g, cout, m * l, false),
                    Operand(&cols, rows, m * l, true),
                )?;
                if let Some(dx) = dx {
                    matmul_here(
                        &mut cols,
                        false,
                        Operand(self.w, cout, rows, true),
                        Operand(g, cout, m * l, false),
                    )?;
                    for (i, dx) in dx.chunks_exact_mut(in_len).enumerate() {
                        geo.col2im(&cols[i * l..], &mut phases, dx, m * l);
                    }
                }
            }
            at += m;
        }
        Ok((dw, db))
    }
}

/// A fused convolution of `x` (B, C, H, W) with `w` and bias `b`, then ReLU if `relu`:
/// `w` is (out, in, k, k) for a convolution, (in, out, k, k) for a transposed one (candle's and
/// PyTorch's layouts).
pub fn conv2d(x: &Tensor, w: &Tensor, b: &Tensor, spec: ConvSpec, relu: bool) -> Result<Tensor> {
    conv2d_with_sink(x, w, b, spec, relu, None)
}

/// [`conv2d`] whose weight and bias gradients go to a gradient sink when it is enabled.
pub(crate) fn conv2d_with_sink(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    spec: ConvSpec,
    relu: bool,
    sink: Option<SinkSlots>,
) -> Result<Tensor> {
    if crate::forms::fused(x) {
        let op = ConvOp {
            spec,
            relu,
            sink,
            taps: None,
        };
        return Ok(x.contiguous()?.apply_op3(w, b, op)?);
    }
    crate::conv_gemm::conv2d(x, w, b, spec, relu)
}

/// A convolution (not transposed, no ReLU) that reads only the kernel offsets of `taps` (bit
/// `ki·k + kj` for offset (ki, kj), k ≤ 11): the weights of the others are taken as zero and get
/// a zero gradient. On CPU the skipped offsets cost nothing (neither columns nor products);
/// elsewhere the weight is multiplied by the mask.
pub fn conv2d_masked(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    spec: ConvSpec,
    taps: u128,
) -> Result<Tensor> {
    conv2d_masked_with_sink(x, w, b, spec, taps, None)
}

/// [`conv2d_masked`] whose weight and bias gradients go to a gradient sink when it is enabled.
pub(crate) fn conv2d_masked_with_sink(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    spec: ConvSpec,
    taps: u128,
    sink: Option<SinkSlots>,
) -> Result<Tensor> {
    let k = w.dim(3)?;
    if spec.transposed || k * k > 128 {
        return Err(crate::ModelError::Spec(format!(
            "a masked convolution is not transposed and has at most 11×11 taps, not {k}×{k} ({spec:?})"
        )));
    }
    if crate::forms::fused(x) {
        let op = ConvOp {
            spec,
            relu: false,
            sink,
            taps: Some(taps),
        };
        return Ok(x.contiguous()?.apply_op3(w, b, op)?);
    }
    let mask: Vec<f32> = (0..k * k)
        .map(|t| f32::from(u8::from(taps & (1 << t) != 0)))
        .collect();
    let mask = Tensor::from_vec(mask, (1, 1, k, k), w.device())?.to_dtype(w.dtype())?;
    crate::conv_gemm::conv2d(x, &w.broadcast_mul(&mask)?, b, spec, false)
}
