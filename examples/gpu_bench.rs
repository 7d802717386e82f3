//! GPU benchmark of the BAR scorer (feature `cuda`): the issue's targets;
//! with `--tar`, the TAR model's decision latency instead.
//!
//! ```sh
//! cargo run --release --features cuda --example gpu_bench -- [--ads 1000000] [--queries 200]
//!     [--threads N] [--batches 256,1024,4096,16384,65536] [--quick] [--json]
//! cargo run --release --features cuda --example gpu_bench -- --tar [--calls 300] [--days 8]
//!     [--weights DIR] [--quick]
//! ```
//!
//! `--tar`: one decision = `GpuTarModel::generate` at batch 1 (default
//! `TarConfig`, random weights: the latency does not depend on their
//! values; a mid-day history of 24 observed steps; default sampling
//! options), timed call by call after a warm-up, `TarModel::generate` on
//! one CPU thread beside it; prints p50 / p99 and one JSON line per device,
//! `{"policy":"tar","decision_ms_p50":..,"decision_ms_p99":..,"device":"cuda"|"cpu"}`.
//!
//! Then the *policy's* decision (issue 7's measure): `TarPolicy::act` as
//! `examples/trajectory.rs` builds the policy (the shipped
//! `tar-small.safetensors` and `tar-inverse-small.safetensors` from
//! `--weights DIR`, default `weights/`; target efficiency the 0.9-quantile
//! of 100 logged days, 10 with `--quick`; top-p 0.9, seed 1; sparse preset,
//! 48 ticks, budget ratio 0.75), once planning on the CPU and once with
//! `GpuTarModel` as its generator (`TarPolicy::with_generator`), over
//! `--days` simulated days (default 8, 1 with `--quick`; the agent
//! advertiser varies with the day as in `tar_eval`). The two policies see
//! the same observations (the CPU policy's bids drive the day), each `act`
//! timed; prints p50 / p99 per device as
//! `{"policy":"tar","decision_ms_p50":..,"decision_ms_p99":..,"device":..,"what":"policy"}`
//! and how far the GPU policy's bids are from the CPU's (largest relative
//! difference, ticks more than 1e-3 apart: sampled codes may differ at
//! near-boundary draws, after which that day's plans differ).
//!
//! Prints, in order: the device's floors (copy bandwidth, sgemm rates), a
//! scoring sweep over batch sizes (CPU one thread beside the GPU, with the
//! candidates uploaded per batch and resident on the device), a per-step
//! profile of the device pass with each step's floor and the gap to it,
//! NANN search (`Index::search_with`) over `--ads` ads with the CPU and the
//! GPU scorer (QPS, p50 / p99 latency per request), and a short summary
//! table last. `--json` adds one JSON object per result line (prefixed
//! `json: `). Needs a CUDA device; exits 2 without one.
//!
//! Model: `BarConfig::default()` (E 16, D 64, A 32, H 64, L 50, T 8) with
//! random weights; users have 50 unmasked sequence positions; ads are
//! random feature draws (their z_a from the model's ad side).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nann::bar::model::BarModel;
use nann::bar::{AdFeatures, AdTokens, BarConfig, BarScorer, BidFeatures, UserFeatures};
use nann::cuda::{
    DevBuf, Exec, GpuBarScorer, GpuDevice, GpuOptions, GpuTarModel, GpuUserState, MatmulBackend,
    StepProfile,
};
use nann::tar::data::{DataConfig, Dataset, SplitMix};
use nann::tar::inverse::InverseDynamics;
use nann::tar::model::{GenerateOptions, TarConfig, TarModel, STEP_FEATURES};
use nann::tar::sim::{run_episode, DayContext, Observation, Policy, Preset, SimConfig};
use nann::tar::TarPolicy;
use nann::{BeamParams, CandidateBatch, Index, IndexParams, Metric, Scorer};

struct Args {
    ads: usize,
    queries: usize,
    threads: usize,
    batches: Vec<usize>,
    json: bool,
    quick: bool,
    tar: bool,
    calls: usize,
    days: Option<u64>,
    weights: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut args = Args {
        ads: 1_000_000,
        queries: 200,
        threads,
        batches: vec![256, 1024, 4096, 16384, 65536],
        json: false,
        quick: false,
        tar: false,
        calls: 300,
        days: None,
        weights: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--ads" => args.ads = value()?.parse().map_err(|e| format!("--ads: {e}"))?,
            "--queries" => {
                args.queries = value()?.parse().map_err(|e| format!("--queries: {e}"))?
            }
            "--threads" => {
                args.threads = value()?.parse().map_err(|e| format!("--threads: {e}"))?
            }
            "--batches" => {
                args.batches = value()?
                    .split(',')
                    .map(|b| b.trim().parse().map_err(|e| format!("--batches: {e}")))
                    .collect::<Result<_, _>>()?
            }
            "--json" => args.json = true,
            "--quick" => args.quick = true,
            "--tar" => args.tar = true,
            "--calls" => args.calls = value()?.parse().map_err(|e| format!("--calls: {e}"))?,
            "--days" => {
                args.days = Some(value()?.parse().map_err(|e| format!("--days: {e}"))?);
            }
            "--weights" => args.weights = Some(value()?),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if args.batches.is_empty() || args.batches.contains(&0) || args.ads == 0 || args.threads == 0 {
        return Err("batches, ads and threads must be positive".into());
    }
    if args.calls == 0 || args.days == Some(0) {
        return Err("--calls and --days must be positive".into());
    }
    Ok(args)
}

/// A deterministic generator.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn unit(&mut self) -> f32 {
        self.next() as f32 / (1u64 << 31) as f32
    }
}

fn random_ad(c: &BarConfig, rng: &mut Lcg) -> AdTokens {
    AdFeatures {
        item: 1 + rng.below(c.item_vocab - 1) as u32,
        cate: 1 + rng.below(c.cate_vocab - 1) as u32,
        brand: rng.below(c.brand_vocab) as u32,
        bid: BidFeatures {
            bid_type: rng.below(c.bid_type_vocab) as u32,
            bid_constraint: rng.unit() * 200.0,
            budget_left_ratio: rng.unit(),
            time_left_ratio: rng.unit(),
            default_bid_value: rng.unit() * 50.0,
        },
    }
    .tokens(c)
    .expect("valid features")
}

fn random_user(c: &BarConfig, rng: &mut Lcg) -> UserFeatures {
    let len = c.max_seq_len;
    UserFeatures {
        fields: c
            .user_field_vocab
            .iter()
            .map(|&v| rng.below(v) as u32)
            .collect(),
        seq_items: (0..len)
            .map(|_| 1 + rng.below(c.item_vocab - 1) as u32)
            .collect(),
        seq_cates: (0..len).map(|_| rng.below(c.cate_vocab) as u32).collect(),
    }
}

/// Runs `f` until `min` has passed (at least `min_reps` times); seconds per call.
fn time_per_call(min: Duration, min_reps: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm-up
    let start = Instant::now();
    let mut reps = 0;
    while reps < min_reps || start.elapsed() < min {
        f();
        reps += 1;
    }
    start.elapsed().as_secs_f64() / reps as f64
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[(((p / 100.0) * (sorted.len() - 1) as f64).round() as usize).min(sorted.len() - 1)]
}

/// Counts candidates and batches a scorer sees.
struct Counting<'a, S> {
    inner: &'a S,
    candidates: AtomicUsize,
    batches: AtomicUsize,
}

impl<S: Scorer> Scorer for Counting<'_, S> {
    type Query = S::Query;
    fn score_batch(
        &self,
        q: &S::Query,
        batch: &CandidateBatch<'_>,
        out: &mut [f32],
    ) -> nann::Result<()> {
        self.candidates.fetch_add(batch.len(), Ordering::Relaxed);
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.inner.score_batch(q, batch, out)
    }
}

fn fail(e: impl std::fmt::Display) -> ! {
    eprintln!("gpu_bench: {e}");
    std::process::exit(1)
}

/// Device floors: copy bandwidth (bytes read + written per second) and the
/// sgemm rate (flop/s) of each backend at 4096^3.
fn floors(dev: &Arc<GpuDevice>, quick: bool) -> (f64, Vec<(MatmulBackend, f64)>) {
    let x = Exec::new(Arc::clone(dev), MatmulBackend::Kernel).unwrap_or_else(|e| fail(e));
    let floats = if quick { 1 << 16 } else { 1 << 27 }; // 512 MiB
    let src = DevBuf::<f32>::zeros(x.stream(), floats).unwrap_or_else(|e| fail(e));
    let dst = DevBuf::<f32>::zeros(x.stream(), floats).unwrap_or_else(|e| fail(e));
    let per = time_per_call(Duration::from_millis(300), 5, || {
        x.copy_f32x4(&dst, &src, floats / 4)
            .unwrap_or_else(|e| fail(e));
        x.synchronize().unwrap_or_else(|e| fail(e));
    });
    let bandwidth = 2.0 * 4.0 * floats as f64 / per;
    let mut rates = Vec::new();
    let size = if quick { 64 } else { 4096 };
    let mut backends = vec![MatmulBackend::Kernel];
    if dev.has_cublas() {
        backends.extend([MatmulBackend::Cublas, MatmulBackend::CublasTf32]);
    }
    for backend in backends {
        let x = Exec::new(Arc::clone(dev), backend).unwrap_or_else(|e| fail(e));
        let a = DevBuf::<f32>::zeros(x.stream(), size * size).unwrap_or_else(|e| fail(e));
        let b = DevBuf::<f32>::zeros(x.stream(), size * size).unwrap_or_else(|e| fail(e));
        let c = DevBuf::<f32>::zeros(x.stream(), size * size).unwrap_or_else(|e| fail(e));
        let ma = a.mat(0, size, size, size).unwrap_or_else(|e| fail(e));
        let mb = b.mat(0, size, size, size).unwrap_or_else(|e| fail(e));
        let mc = c.mat(0, size, size, size).unwrap_or_else(|e| fail(e));
        let per = time_per_call(Duration::from_millis(300), 3, || {
            x.linear(&ma, &mb, None, &mc, 0.0, nann::cuda::Act::None)
                .unwrap_or_else(|e| fail(e));
            x.synchronize().unwrap_or_else(|e| fail(e));
        });
        rates.push((backend, 2.0 * (size as f64).powi(3) / per));
    }
    (bandwidth, rates)
}

fn main() {
    let args = parse_args().unwrap_or_else(|e| {
        eprintln!("gpu_bench: {e}");
        std::process::exit(2)
    });
    let dev = match GpuDevice::get(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("gpu_bench: no CUDA device: {e}");
            std::process::exit(2)
        }
    };
    if args.tar {
        tar_bench(&dev, &args);
        return;
    }
    let json = |line: String| {
        if args.json {
            println!("json: {line}");
        }
    };
    let config = BarConfig::default();
    let (e, d, a, h, l, t) = (
        config.emb_dim,
        config.d_model,
        config.d_attn,
        config.head_hidden,
        config.max_seq_len,
        config.ad_tokens(),
    );
    let model = Arc::new(BarModel::random(config.clone(), 2024).unwrap_or_else(|e| fail(e)));
    let (cc_major, cc_minor) = dev.compute_capability();
    println!(
        "nann gpu_bench: device {} (compute {cc_major}.{cc_minor}, kernels for {}), cuBLAS {}",
        dev.name(),
        dev.arch(),
        if dev.has_cublas() {
            "yes"
        } else {
            "no (matmul kernel only)"
        }
    );
    let kflop = 2.0
        * (d * a
            + l * (a + d)
            + 2 * d * (2 * a + h)
            + l * 2 * a
            + t * e * 2 * a
            + t * 2 * a
            + 2 * (2 * a * h)
            + 3 * h * h
            + h) as f64
        / 1e3;
    println!(
        "model: BarConfig::default(): E {e}, D {d}, A {a}, H {h}, L {l} (all unmasked), T {t}; \
         {kflop:.0} kflop per candidate (straight form)"
    );
    let min_time = Duration::from_millis(if args.quick { 20 } else { 300 });

    // ---- floors
    let (bandwidth, rates) = floors(&dev, args.quick);
    println!("\n== device floors");
    println!(
        "copy bandwidth       {:>9.1} GB/s (read + write)",
        bandwidth / 1e9
    );
    json(format!(
        "{{\"floor\":\"copy_bandwidth_gbs\",\"value\":{:.1}}}",
        bandwidth / 1e9
    ));
    for (backend, rate) in &rates {
        println!(
            "sgemm {:<14} {:>9.1} GFLOP/s",
            format!("{backend:?}"),
            rate / 1e9
        );
        json(format!(
            "{{\"floor\":\"sgemm_gflops\",\"backend\":\"{backend:?}\",\"value\":{:.1}}}",
            rate / 1e9
        ));
    }
    let fp32_rate = rates
        .iter()
        .filter(|(b, _)| *b != MatmulBackend::CublasTf32)
        .map(|(_, r)| *r)
        .fold(0.0, f64::max);

    // ---- ads (index content and scoring pool)
    let mut rng = Lcg(7);
    let max_batch = args.batches.iter().copied().max().unwrap_or(1);
    let n_ads = args.ads.max(max_batch);
    let t0 = Instant::now();
    let tokens: Vec<AdTokens> = (0..n_ads).map(|_| random_ad(&config, &mut rng)).collect();
    let mut z = vec![0.0f32; n_ads * d];
    let per = n_ads.div_ceil(args.threads);
    std::thread::scope(|s| {
        for (tk, out) in tokens.chunks(per).zip(z.chunks_mut(per * d)) {
            let model = &model;
            s.spawn(move || out.copy_from_slice(&model.ad_vectors(tk).expect("valid tokens")));
        }
    });
    println!(
        "\n{n_ads} random ads' sides in {:.1} s",
        t0.elapsed().as_secs_f64()
    );

    // ---- scoring sweep
    let backends: Vec<MatmulBackend> = rates.iter().map(|(b, _)| *b).collect();
    let scorers: Vec<(MatmulBackend, GpuBarScorer)> = backends
        .iter()
        .map(|&backend| {
            let options = GpuOptions {
                backend,
                max_batch: max_batch.max(1 << 16),
                poison: false,
            };
            let s = GpuBarScorer::with_options(Arc::clone(&model), Arc::clone(&dev), options)
                .unwrap_or_else(|e| fail(e));
            (backend, s)
        })
        .collect();
    let default_backend = if dev.has_cublas() {
        MatmulBackend::Cublas
    } else {
        MatmulBackend::Kernel
    };
    let gpu = &scorers
        .iter()
        .find(|(b, _)| *b == default_backend)
        .unwrap_or(&scorers[0])
        .1;
    let user_features = random_user(&config, &mut rng);
    let cpu_user = model.user_side(&user_features).unwrap_or_else(|e| fail(e));
    let keys: Vec<u64> = (0..n_ads as u64).collect();
    let table_ads = max_batch.min(n_ads);
    let tables: Vec<_> = scorers
        .iter()
        .map(|(_, s)| {
            s.upload_ads(
                &keys[..table_ads],
                &z[..table_ads * d],
                &tokens[..table_ads],
            )
            .unwrap_or_else(|e| fail(e))
        })
        .collect();
    let users: Vec<GpuUserState> = scorers
        .iter()
        .map(|(_, s)| s.user_state(&user_features).unwrap_or_else(|e| fail(e)))
        .collect();
    println!(
        "\n== scoring: million candidate scores per second (CPU: 1 thread, BarModel::score_into)"
    );
    print!("{:>7} {:>9}", "batch", "cpu");
    print!(" {:>13}", format!("gpu-host {default_backend:?}"));
    for (b, _) in &scorers {
        print!(" {:>16}", format!("gpu-dev {b:?}"));
    }
    println!(" {:>10}", "host/cpu");
    let mut sweep = Vec::new();
    for &n in &args.batches {
        let (zs, ts) = (&z[..n * d], &tokens[..n]);
        let mut out = vec![0.0f32; n];
        let cpu_s = time_per_call(min_time, 2, || {
            model
                .score_into(&cpu_user, zs, ts, &mut out)
                .unwrap_or_else(|e| fail(e));
        });
        let gpu_user = &users[scorers
            .iter()
            .position(|(b, _)| *b == default_backend)
            .unwrap_or(0)];
        let host_s = time_per_call(min_time, 3, || {
            gpu.score_into(gpu_user, zs, ts, &mut out)
                .unwrap_or_else(|e| fail(e));
        });
        let ids: Vec<u32> = (0..n).map(|_| rng.below(table_ads) as u32).collect();
        let mut dev_rates = Vec::new();
        for (((b, s), table), user) in scorers.iter().zip(&tables).zip(&users) {
            let dev_s = time_per_call(min_time, 3, || {
                s.score_table(user, table, &ids, &mut out)
                    .unwrap_or_else(|e| fail(e));
            });
            dev_rates.push((*b, n as f64 / dev_s / 1e6));
        }
        let (cpu_r, host_r) = (n as f64 / cpu_s / 1e6, n as f64 / host_s / 1e6);
        print!("{n:>7} {cpu_r:>9.2} {host_r:>13.2}");
        for (_, r) in &dev_rates {
            print!(" {r:>16.2}");
        }
        println!(" {:>9.1}x", host_r / cpu_r);
        json(format!(
            "{{\"batch\":{n},\"cpu_mps\":{cpu_r:.3},\"gpu_host_mps\":{host_r:.3},{}}}",
            dev_rates
                .iter()
                .map(|(b, r)| format!("\"gpu_dev_{b:?}_mps\":{r:.3}"))
                .collect::<Vec<_>>()
                .join(",")
        ));
        sweep.push((n, cpu_r, host_r, dev_rates));
    }
    let wins_1 = sweep.iter().find(|s| s.2 > s.1).map(|s| s.0);
    let wins_all = sweep
        .iter()
        .find(|s| s.2 > s.1 * args.threads as f64)
        .map(|s| s.0);

    // ---- per-step profile
    let prof_n = args
        .batches
        .iter()
        .copied()
        .filter(|&b| b <= 16384)
        .max()
        .unwrap_or(args.batches[0]);
    let gpu_user = &users[scorers
        .iter()
        .position(|(b, _)| *b == default_backend)
        .unwrap_or(0)];
    let steps: Vec<StepProfile> = gpu
        .profile(gpu_user, &z[..prof_n * d], &tokens[..prof_n], 5)
        .unwrap_or_else(|e| fail(e));
    println!(
        "\n== device pass at batch {prof_n} ({default_backend:?}): per step, floor = max(bytes / \
         copy bandwidth, flops / best fp32 sgemm rate)"
    );
    println!(
        "{:<47} {:>8} {:>9} {:>8} {:>9} {:>6}",
        "step", "ms", "GFLOP/s", "GB/s", "floor ms", "gap"
    );
    let mut device_ms = 0.0;
    for s in &steps {
        let floor = (s.bytes / bandwidth).max(s.flops / fp32_rate) * 1e3;
        let is_copy = s.name.contains("H2D") || s.name.contains("D2H");
        if !is_copy {
            device_ms += s.ms;
        }
        println!(
            "{:<47} {:>8.4} {:>9.1} {:>8.1} {:>9.4} {:>5.1}x",
            s.name,
            s.ms,
            s.flops / s.ms / 1e6,
            s.bytes / s.ms / 1e6,
            if is_copy { f64::NAN } else { floor },
            if is_copy { f64::NAN } else { s.ms / floor }
        );
        json(format!(
            "{{\"step\":\"{}\",\"batch\":{prof_n},\"ms\":{:.5},\"flops\":{:.0},\"bytes\":{:.0},\"floor_ms\":{}}}",
            s.name.split_whitespace().collect::<Vec<_>>().join(" "),
            s.ms,
            s.flops,
            s.bytes,
            if is_copy { "null".to_string() } else { format!("{floor:.5}") }
        ));
    }
    let device_rate = prof_n as f64 / device_ms / 1e3;
    println!(
        "device pass (no copies): {device_ms:.3} ms = {device_rate:.1} M scores/s at batch {prof_n}"
    );

    // ---- NANN search
    let n_index = if args.quick {
        args.ads.min(3000)
    } else {
        args.ads
    };
    println!("\n== NANN search over {n_index} ads (beam (100,1),(200,1),(400,3), top 200)");
    let t0 = Instant::now();
    let index = Index::new(
        IndexParams::new(d, Metric::L2)
            .m(16)
            .ef_construction(100)
            .capacity(n_index)
            .payload_len(config.payload_bytes()),
    )
    .unwrap_or_else(|e| fail(e));
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..args.threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n_index {
                    break;
                }
                index
                    .insert_with_payload(i as u64, &z[i * d..(i + 1) * d], &tokens[i].to_payload())
                    .unwrap_or_else(|e| fail(e));
            });
        }
    });
    println!(
        "index built in {:.1} s ({} threads)",
        t0.elapsed().as_secs_f64(),
        args.threads
    );
    let params = BeamParams::default();
    let queries: Vec<UserFeatures> = (0..args.queries)
        .map(|_| random_user(&config, &mut rng))
        .collect();
    let cpu_bar = BarScorer::new(Arc::clone(&model));
    let cpu_scorer = Counting {
        inner: &cpu_bar,
        candidates: AtomicUsize::new(0),
        batches: AtomicUsize::new(0),
    };
    let gpu_scorer = Counting {
        inner: gpu,
        candidates: AtomicUsize::new(0),
        batches: AtomicUsize::new(0),
    };
    // (label, threads, qps, p50 ms, p99 ms, candidates per query, batches per query)
    let mut search_rows: Vec<(String, usize, f64, f64, f64, f64, f64)> = Vec::new();
    let thread_counts: Vec<usize> = if args.threads > 1 {
        vec![1, args.threads]
    } else {
        vec![1]
    };
    for &threads in &thread_counts {
        for which in ["cpu", "gpu"] {
            let lat = std::sync::Mutex::new(Vec::new());
            let next = AtomicUsize::new(0);
            let (c0, b0) = match which {
                "cpu" => (&cpu_scorer.candidates, &cpu_scorer.batches),
                _ => (&gpu_scorer.candidates, &gpu_scorer.batches),
            };
            let (c_start, b_start) = (c0.load(Ordering::Relaxed), b0.load(Ordering::Relaxed));
            let start = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..threads {
                    s.spawn(|| {
                        let mut mine = Vec::new();
                        loop {
                            let q = next.fetch_add(1, Ordering::Relaxed);
                            if q >= queries.len() {
                                break;
                            }
                            let t = Instant::now();
                            let hits = if which == "cpu" {
                                let u = model.user_side(&queries[q]).unwrap_or_else(|e| fail(e));
                                index.search_with(&cpu_scorer, &u, &params)
                            } else {
                                let u = gpu.user_state(&queries[q]).unwrap_or_else(|e| fail(e));
                                index.search_with(&gpu_scorer, &u, &params)
                            };
                            hits.unwrap_or_else(|e| fail(e));
                            mine.push(t.elapsed().as_secs_f64() * 1e3);
                        }
                        lat.lock().unwrap_or_else(|p| p.into_inner()).extend(mine);
                    });
                }
            });
            let wall = start.elapsed().as_secs_f64();
            let mut lat = lat.into_inner().unwrap_or_else(|p| p.into_inner());
            lat.sort_by(f64::total_cmp);
            let nq = queries.len() as f64;
            let cands = (c0.load(Ordering::Relaxed) - c_start) as f64 / nq;
            let batches = (b0.load(Ordering::Relaxed) - b_start) as f64 / nq;
            let row = (
                which.to_string(),
                threads,
                nq / wall,
                percentile(&lat, 50.0),
                percentile(&lat, 99.0),
                cands,
                batches,
            );
            json(format!(
                "{{\"search\":\"{}\",\"ads\":{n_index},\"threads\":{threads},\"qps\":{:.1},\"p50_ms\":{:.3},\"p99_ms\":{:.3},\"candidates_per_query\":{:.0},\"batches_per_query\":{:.1}}}",
                row.0, row.2, row.3, row.4, row.5, row.6
            ));
            search_rows.push(row);
        }
    }
    println!(
        "{:<7} {:>7} {:>9} {:>9} {:>9} {:>12} {:>9}",
        "scorer", "threads", "QPS", "p50 ms", "p99 ms", "cands/query", "batches"
    );
    for r in &search_rows {
        println!(
            "{:<7} {:>7} {:>9.1} {:>9.3} {:>9.3} {:>12.0} {:>9.1}",
            r.0, r.1, r.2, r.3, r.4, r.5, r.6
        );
    }

    // ---- summary
    let at16k = sweep.iter().filter(|s| s.0 >= 16384).min_by_key(|s| s.0);
    println!(
        "\n== summary (targets: >= 50M scores/s at batch >= 16k; search QPS / p99 beside the CPU)"
    );
    println!("{:<44} {:>14}", "measure", "value");
    let best_dev = |s: &(usize, f64, f64, Vec<(MatmulBackend, f64)>)| {
        s.3.iter()
            .filter(|(b, _)| *b != MatmulBackend::CublasTf32)
            .map(|(_, r)| *r)
            .fold(0.0, f64::max)
    };
    if let Some(s) = at16k {
        println!(
            "{:<44} {:>12.1} M",
            format!("scores/s, batch {}, device-resident fp32", s.0),
            best_dev(s)
        );
        println!(
            "{:<44} {:>12.1} M",
            format!("scores/s, batch {}, uploaded per batch", s.0),
            s.2
        );
        println!(
            "{:<44} {:>12.2} M",
            format!("scores/s, batch {}, CPU 1 thread", s.0),
            s.1
        );
    }
    println!(
        "{:<44} {:>12.1} M",
        format!("device pass only, batch {prof_n}"),
        device_rate
    );
    let fmt_batch = |b: Option<usize>| b.map_or("none in sweep".to_string(), |b| b.to_string());
    println!(
        "{:<44} {:>14}",
        "GPU (uploaded) beats 1 CPU thread from batch",
        fmt_batch(wins_1)
    );
    println!(
        "{:<44} {:>14}",
        format!(
            "GPU (uploaded) beats {} CPU threads from batch",
            args.threads
        ),
        fmt_batch(wins_all)
    );
    for r in &search_rows {
        println!(
            "{:<44} {:>14}",
            format!("search {} x{} QPS / p99 ms", r.0, r.1),
            format!("{:.0} / {:.2}", r.2, r.4)
        );
    }
    println!("{:<44} {:>12.1} GB/s", "copy bandwidth", bandwidth / 1e9);
    println!("{:<44} {:>9.1} GFLOP/s", "best fp32 sgemm", fp32_rate / 1e9);
}

/// `(p50, p99)` in milliseconds of `calls` timed calls of `f` after
/// `warmup` untimed ones.
fn latencies(warmup: usize, calls: usize, mut f: impl FnMut()) -> (f64, f64) {
    for _ in 0..warmup {
        f();
    }
    let mut ms: Vec<f64> = (0..calls)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    (percentile(&ms, 50.0), percentile(&ms, 99.0))
}

/// `--tar`: the TAR model's decision latency at batch 1, GPU and CPU.
fn tar_bench(dev: &Arc<GpuDevice>, args: &Args) {
    let config = TarConfig::default();
    let model = TarModel::random(config.clone(), 2024).unwrap_or_else(|e| fail(e));
    let gpu = GpuTarModel::new(&model, Arc::clone(dev)).unwrap_or_else(|e| fail(e));
    let (calls, warmup) = if args.quick {
        (args.calls.min(10), 2)
    } else {
        (args.calls, 20)
    };
    let y = model.condition(Some(&[0.8, 0.95, 0.9, 3.5]));
    let seen = 24;
    let mut lcg = Lcg(11);
    let raw: Vec<f32> = (0..seen * STEP_FEATURES).map(|_| lcg.unit()).collect();
    let history = model.normalize_step(&raw).unwrap_or_else(|e| fail(e));
    let opts = GenerateOptions::default();
    println!(
        "nann gpu_bench --tar: device {}; TarConfig::default() (T {}, scales {:?}, D {}, {} \
         blocks, V {}), {} parameters; {seen} steps seen; {calls} calls after {warmup} warm-up",
        dev.name(),
        config.steps,
        config.scales,
        config.d_model,
        config.blocks,
        config.codebook_size,
        model.parameter_count()
    );
    let mut rng = SplitMix::new(5);
    let (gpu_p50, gpu_p99) = latencies(warmup, calls, || {
        let g = gpu
            .generate(&y, &history, &opts, &mut rng)
            .unwrap_or_else(|e| fail(e));
        assert_eq!(g.x_hat.len(), config.steps * STEP_FEATURES);
    });
    let mut rng = SplitMix::new(5);
    let (cpu_p50, cpu_p99) = latencies(warmup, calls, || {
        let g = model
            .generate(&y, &history, &opts, &mut rng)
            .unwrap_or_else(|e| fail(e));
        assert_eq!(g.x_hat.len(), config.steps * STEP_FEATURES);
    });
    let policy = policy_bench(dev, args);
    println!("\n== TAR summary (one decision = one generation at batch 1)");
    println!("{:<28} {:>12} {:>12}", "device", "p50 ms", "p99 ms");
    println!(
        "{:<28} {gpu_p50:>12.3} {gpu_p99:>12.3}",
        format!("cuda ({})", dev.name())
    );
    println!("{:<28} {cpu_p50:>12.3} {cpu_p99:>12.3}", "cpu (1 thread)");
    for (device, p50, p99) in [("cuda", gpu_p50, gpu_p99), ("cpu", cpu_p50, cpu_p99)] {
        println!(
            "{{\"policy\":\"tar\",\"decision_ms_p50\":{p50:.4},\"decision_ms_p99\":{p99:.4},\"device\":\"{device}\"}}"
        );
    }
    policy.print(dev);
}

/// Where the policy's shipped weights are: `--weights DIR`, else
/// `weights/` if it holds them, else the source tree's.
fn weights_dir(args: &Args) -> String {
    if let Some(dir) = &args.weights {
        return dir.clone();
    }
    let here = "weights";
    if std::path::Path::new(here)
        .join("tar-small.safetensors")
        .exists()
    {
        here.into()
    } else {
        concat!(env!("CARGO_MANIFEST_DIR"), "/weights").into()
    }
}

/// Times every decision of two TAR policies answering the same
/// observations: `cpu` bids (its bids drive the day), `gpu` answers beside
/// it; records both bids (in CPA targets).
struct Paired {
    cpu: TarPolicy,
    gpu: TarPolicy,
    cpa: f64,
    cpu_ms: Vec<f64>,
    gpu_ms: Vec<f64>,
    bids: Vec<(f64, f64)>,
}

impl Policy for Paired {
    fn name(&self) -> &str {
        "tar"
    }
    fn begin_day(&mut self, day: &DayContext<'_>) {
        self.cpa = day.cpa_target;
        self.cpu.begin_day(day);
        self.gpu.begin_day(day);
    }
    fn act(&mut self, obs: &Observation<'_>) -> f64 {
        let t = Instant::now();
        let c = self.cpu.act(obs);
        self.cpu_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let g = self.gpu.act(obs);
        self.gpu_ms.push(t.elapsed().as_secs_f64() * 1e3);
        self.bids.push((c / self.cpa, g / self.cpa));
        c
    }
}

/// The policy-level measure of `--tar` (see the module docs).
struct PolicyReport {
    days: u64,
    weights: String,
    target: f32,
    /// `(p50, p99)` ms per device.
    gpu: (f64, f64),
    cpu: (f64, f64),
    ticks: usize,
    max_rel: f64,
    over: usize,
    errors: (u64, u64),
}

impl PolicyReport {
    fn print(&self, dev: &GpuDevice) {
        println!(
            "\n== TAR policy decision (TarPolicy::act as examples/trajectory.rs builds it: \
             weights from {}/, inverse dynamics, target {:.3}; days: {} x 48 ticks)",
            self.weights, self.target, self.days
        );
        println!("{:<28} {:>12} {:>12}", "device", "p50 ms", "p99 ms");
        println!(
            "{:<28} {:>12.3} {:>12.3}",
            format!("cuda ({})", dev.name()),
            self.gpu.0,
            self.gpu.1
        );
        println!(
            "{:<28} {:>12.3} {:>12.3}",
            "cpu (1 thread)", self.cpu.0, self.cpu.1
        );
        println!(
            "bids, cuda vs cpu policy: {} ticks, max relative difference {:.3e}, {} ticks \
             differ by more than 1e-3 (sampled codes may differ at near-boundary draws); \
             fallback decisions cpu {} / cuda {}",
            self.ticks, self.max_rel, self.over, self.errors.0, self.errors.1
        );
        for (device, (p50, p99)) in [("cuda", self.gpu), ("cpu", self.cpu)] {
            println!(
                "{{\"policy\":\"tar\",\"decision_ms_p50\":{p50:.4},\"decision_ms_p99\":{p99:.4},\"device\":\"{device}\",\"what\":\"policy\"}}"
            );
        }
        println!(
            "{{\"policy\":\"tar\",\"what\":\"policy_bids\",\"ticks\":{},\"max_rel_diff\":{:.3e},\"ticks_over_1e-3\":{},\"errors_cpu\":{},\"errors_cuda\":{}}}",
            self.ticks, self.max_rel, self.over, self.errors.0, self.errors.1
        );
    }
}

/// `--tar`, the policy's decision: the shipped weights, the policy of
/// examples/trajectory.rs planning on the CPU and on the device, played
/// side by side over simulated days.
fn policy_bench(dev: &Arc<GpuDevice>, args: &Args) -> PolicyReport {
    let dir = weights_dir(args);
    let (tar_file, inverse_file) = (
        format!("{dir}/tar-small.safetensors"),
        format!("{dir}/tar-inverse-small.safetensors"),
    );
    let model = TarModel::load(&tar_file).unwrap_or_else(|e| {
        fail(format!(
            "cannot load the TAR weights {tar_file}: {e} (pass --weights DIR)"
        ))
    });
    let inverse = InverseDynamics::load(&inverse_file).unwrap_or_else(|e| {
        fail(format!(
            "cannot load the inverse-dynamics weights {inverse_file}: {e} (pass --weights DIR)"
        ))
    });
    let (model, inverse) = (Arc::new(model), Arc::new(inverse));
    let gpu = Arc::new(GpuTarModel::new(&model, Arc::clone(dev)).unwrap_or_else(|e| fail(e)));
    let days = args.days.unwrap_or(if args.quick { 1 } else { 8 });
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // examples/trajectory.rs's day and target.
    let sim = SimConfig::preset(Preset::Sparse)
        .with_ticks(48)
        .with_budget_ratio(0.75);
    let pvs_per_tick = sim.pvs_per_day as f64 / sim.ticks as f64;
    let target_days = if args.quick { 10 } else { 100 };
    let log = Dataset::collect(
        &sim.clone().with_agent(0).with_budget_ratio(1.0),
        &DataConfig {
            episodes: target_days,
            first_seed: 0,
            threads,
            ..DataConfig::default()
        },
    )
    .unwrap_or_else(|e| fail(e));
    let target = log.attribute_quantile(0, 0.9);
    let policy = || {
        TarPolicy::new(Arc::clone(&model), target, pvs_per_tick)
            .with_options(GenerateOptions {
                top_p: 0.9,
                ..GenerateOptions::default()
            })
            .with_seed(1)
            .with_inverse_dynamics(Arc::clone(&inverse))
    };
    println!(
        "\nTAR policy: {tar_file} ({} parameters) and {inverse_file}; target efficiency {target:.3} \
         (the 0.9-quantile of {target_days} logged days); days: {days}",
        model.parameter_count()
    );
    let mut paired = Paired {
        cpu: policy(),
        gpu: policy().with_generator(gpu.clone()),
        cpa: 1.0,
        cpu_ms: Vec::new(),
        gpu_ms: Vec::new(),
        bids: Vec::new(),
    };
    // Warm-up: the device's first generations (and the CPU's caches).
    let warm = model.condition(Some(&[target, 0.95, 0.95, 3.5]));
    let mut rng = SplitMix::new(1);
    for _ in 0..if args.quick { 2 } else { 20 } {
        gpu.generate(&warm, &[], &GenerateOptions::default(), &mut rng)
            .unwrap_or_else(|e| fail(e));
    }
    for day in 0..days {
        let config = sim.clone().with_agent(((day * 7) % 48) as usize);
        run_episode(&config, 1_000_000 + day, &mut paired).unwrap_or_else(|e| fail(e));
    }
    let quantiles = |mut ms: Vec<f64>| {
        ms.sort_by(f64::total_cmp);
        (percentile(&ms, 50.0), percentile(&ms, 99.0))
    };
    let rel: Vec<f64> = paired
        .bids
        .iter()
        .map(|&(c, g)| (g - c).abs() / c.abs().max(g.abs()).max(1e-3))
        .collect();
    PolicyReport {
        days,
        weights: dir,
        target,
        gpu: quantiles(std::mem::take(&mut paired.gpu_ms)),
        cpu: quantiles(std::mem::take(&mut paired.cpu_ms)),
        ticks: rel.len(),
        max_rel: rel.iter().copied().fold(0.0, f64::max),
        over: rel.iter().filter(|&&e| e > 1e-3).count(),
        errors: (paired.cpu.errors(), paired.gpu.errors()),
    }
}
