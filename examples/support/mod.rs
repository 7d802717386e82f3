//! Dataset helpers shared by the examples, benches and tests: TEXMEX
//! fvecs/ivecs I/O, generated data sets, brute-force ground truth and recall.
//! (Not part of the library API: included with `#[path]`.)
#![allow(dead_code)]

pub mod heap;

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::Path;

/// Walks the command line as `--flag value` pairs plus a bare `--json`:
/// calls `on_flag(flag, value)` for each pair and returns whether `--json`
/// was given. The examples' shared flag syntax.
pub fn parse_flags(
    mut on_flag: impl FnMut(&str, &str) -> Result<(), String>,
) -> Result<bool, String> {
    let mut json = false;
    let mut raw = std::env::args().skip(1);
    while let Some(flag) = raw.next() {
        if flag == "--json" {
            json = true;
            continue;
        }
        let value = raw.next().ok_or(format!("{flag} needs a value"))?;
        on_flag(&flag, &value)?;
    }
    Ok(json)
}

/// `value` as a number, or an error that names `flag`.
pub fn number<T: std::str::FromStr>(flag: &str, value: &str) -> Result<T, String> {
    value
        .parse()
        .map_err(|_| format!("{flag}: '{value}' is not a number"))
}

/// A row-major matrix of f32 vectors.
#[derive(Debug, Clone)]
pub struct Vectors {
    pub dim: usize,
    pub data: Vec<f32>,
}

impl Vectors {
    pub fn len(&self) -> usize {
        self.data.len().checked_div(self.dim).unwrap_or(0)
    }
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }
    pub fn rows(&self) -> Vec<&[f32]> {
        self.data.chunks_exact(self.dim).collect()
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Reads a `.fvecs`/`.ivecs` file: records of `[dim: i32 LE][dim x 4-byte LE]`.
fn read_vecs_raw(path: &Path) -> io::Result<(usize, Vec<[u8; 4]>)> {
    let mut bytes = Vec::new();
    BufReader::new(File::open(path)?).read_to_end(&mut bytes)?;
    let mut words = bytes.chunks_exact(4).map(|c| [c[0], c[1], c[2], c[3]]);
    if bytes.len() % 4 != 0 {
        return Err(invalid(format!(
            "{}: length is not a multiple of 4",
            path.display()
        )));
    }
    let mut dim = None;
    let mut out = Vec::new();
    while let Some(header) = words.next() {
        let d = i32::from_le_bytes(header);
        if d <= 0 || d > 1 << 20 {
            return Err(invalid(format!("{}: bad dimension {d}", path.display())));
        }
        let d = d as usize;
        if *dim.get_or_insert(d) != d {
            return Err(invalid(format!("{}: mixed dimensions", path.display())));
        }
        for _ in 0..d {
            out.push(
                words
                    .next()
                    .ok_or_else(|| invalid(format!("{}: truncated record", path.display())))?,
            );
        }
    }
    Ok((dim.unwrap_or(0), out))
}

pub fn read_fvecs(path: &Path) -> io::Result<Vectors> {
    let (dim, words) = read_vecs_raw(path)?;
    Ok(Vectors {
        dim,
        data: words.into_iter().map(f32::from_le_bytes).collect(),
    })
}

/// Ground truth: `(k, ids)` row-major.
pub fn read_ivecs(path: &Path) -> io::Result<(usize, Vec<u32>)> {
    let (dim, words) = read_vecs_raw(path)?;
    Ok((
        dim,
        words
            .into_iter()
            .map(|w| i32::from_le_bytes(w) as u32)
            .collect(),
    ))
}

pub fn write_fvecs(path: &Path, v: &Vectors) -> io::Result<()> {
    let mut w = BufWriter::new(File::create(path)?);
    for row in v.data.chunks_exact(v.dim) {
        w.write_all(&(v.dim as i32).to_le_bytes())?;
        for x in row {
            w.write_all(&x.to_le_bytes())?;
        }
    }
    w.flush()
}

pub fn write_ivecs(path: &Path, k: usize, ids: &[u32]) -> io::Result<()> {
    let mut w = BufWriter::new(File::create(path)?);
    for row in ids.chunks_exact(k) {
        w.write_all(&(k as i32).to_le_bytes())?;
        for x in row {
            w.write_all(&(*x as i32).to_le_bytes())?;
        }
    }
    w.flush()
}

/// splitmix64-based generator: reproducible data without an RNG dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = (self.uniform() as f64).max(1e-12);
        let u2 = self.uniform() as f64;
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
}

/// `n` vectors uniform in [0, 1)^dim.
pub fn uniform(n: usize, dim: usize, seed: u64) -> Vectors {
    let mut rng = Rng::new(seed);
    Vectors {
        dim,
        data: (0..n * dim).map(|_| rng.uniform()).collect(),
    }
}

/// `n` vectors from a Gaussian mixture: `clusters` centres ~ N(0, 1), points
/// = centre + N(0, spread^2). Not trivially random: neighbours are mostly
/// in the same cluster, as in real embedding sets.
pub fn clustered(n: usize, dim: usize, clusters: usize, spread: f32, seed: u64) -> Vectors {
    let mut rng = Rng::new(seed);
    let centres: Vec<f32> = (0..clusters * dim).map(|_| rng.normal()).collect();
    let mut data = Vec::with_capacity(n * dim);
    for _ in 0..n {
        let c = (rng.next_u64() % clusters as u64) as usize;
        for j in 0..dim {
            data.push(centres[c * dim + j] + spread * rng.normal());
        }
    }
    Vectors { dim, data }
}

/// Brute-force top-k ids under squared L2, `-dot` (ip) or `-cos` (cos),
/// computed independently of the index's kernels, on `threads` threads.
pub fn ground_truth(
    base: &Vectors,
    queries: &Vectors,
    k: usize,
    metric: &str,
    threads: usize,
) -> Vec<u32> {
    let norms: Vec<f32> = base
        .rows()
        .iter()
        .map(|r| r.iter().map(|x| x * x).sum::<f32>().sqrt())
        .collect();
    let score = |q: &[f32], i: usize| -> f32 {
        let r = base.row(i);
        match metric {
            "l2" => q.iter().zip(r).map(|(a, b)| (a - b) * (a - b)).sum(),
            "ip" => -q.iter().zip(r).map(|(a, b)| a * b).sum::<f32>(),
            _ => -q.iter().zip(r).map(|(a, b)| a * b).sum::<f32>() / norms[i].max(1e-30),
        }
    };
    let nq = queries.len();
    let mut out = vec![0u32; nq * k];
    let threads = threads.max(1);
    let chunk = nq.div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for (t, out_chunk) in out.chunks_mut(chunk * k).enumerate() {
            let score = &score;
            s.spawn(move || {
                for (j, row_out) in out_chunk.chunks_mut(k).enumerate() {
                    let q = queries.row(t * chunk + j);
                    let mut scored: Vec<(f32, u32)> =
                        (0..base.len()).map(|i| (score(q, i), i as u32)).collect();
                    let kk = k.min(scored.len());
                    scored.select_nth_unstable_by(kk.saturating_sub(1), |a, b| a.0.total_cmp(&b.0));
                    scored.truncate(kk);
                    scored.sort_by(|a, b| a.0.total_cmp(&b.0));
                    for (slot, (_, id)) in row_out.iter_mut().zip(scored) {
                        *slot = id;
                    }
                }
            });
        }
    });
    out
}

/// Mean of |found ∩ truth[..k]| / k over queries.
pub fn recall(found: &[Vec<u64>], truth: &[u32], truth_k: usize, k: usize) -> f64 {
    let mut hits = 0usize;
    for (q, keys) in found.iter().enumerate() {
        let row = &truth[q * truth_k..q * truth_k + k];
        hits += keys
            .iter()
            .take(k)
            .filter(|key| row.contains(&(**key as u32)))
            .count();
    }
    hits as f64 / (found.len() * k) as f64
}

/// Keys of the top-`k` hits of every query, nearest first.
pub fn search_keys(
    index: &nann::Index,
    queries: &Vectors,
    k: usize,
    ef: usize,
) -> Result<Vec<Vec<u64>>, nann::Error> {
    queries
        .rows()
        .iter()
        .map(|q| {
            index
                .search(q, k, ef)
                .map(|hits| hits.iter().map(|h| h.key).collect())
        })
        .collect()
}
