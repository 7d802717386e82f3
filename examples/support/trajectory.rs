//! The core of `examples/trajectory.rs` (and of `tests/trajectory_example.rs`):
//! one simulated day of a campaign paced by a policy, each tick's action
//! pushed as the campaign ad's new bid features through the BAR near-line
//! updater into a live index, and the PNG of the day. Not part of the
//! library API: included with `#[path]`.
#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nann::bar::market::Market;
use nann::bar::nearline::{NearlineOptions, NearlineUpdater};
use nann::bar::{AdFeatures, BarModel, BarScorer, BidFeatures, UserState};
use nann::tar::sim::{run_episode, DayContext, Observation, Policy, SimConfig, MIN_BUDGET};
use nann::{BeamParams, Index, IndexParams, Metric};

/// Ad token positions of the three bid features the pacing moves.
const CONSTRAINT_TOKEN: usize = 4;
const BUDGET_TOKEN: usize = 5;
const TIME_TOKEN: usize = 6;

/// The BAR side: the model, the ad market and the live index over it.
pub struct BarWorld {
    pub model: Arc<BarModel>,
    pub market: Market,
    pub index: Arc<Index>,
    pub scorer: BarScorer,
    pub params: BeamParams,
}

impl BarWorld {
    /// Indexes every ad of `market` (its `z_a` as the vector, its tokens as
    /// the payload; key = ad index) on `threads` threads; retrieval returns
    /// the top `top` ads of the beam search `layers` (ef x rounds).
    pub fn build(
        model: Arc<BarModel>,
        market: Market,
        threads: usize,
        layers: &[(usize, usize)],
        top: usize,
    ) -> Result<Self, String> {
        let config = model.config().clone();
        if market.model_config() != config {
            return Err("the BAR weights were trained on a market with other vocabularies".into());
        }
        let tokens = market
            .ads()
            .iter()
            .map(|ad| ad.features.tokens(&config))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let d = config.d_model;
        let index = Index::new(
            IndexParams::new(d, Metric::L2)
                .m(16)
                .ef_construction(100)
                .capacity(tokens.len() + 1)
                .payload_len(config.payload_bytes()),
        )
        .map_err(|e| e.to_string())?;
        let next = AtomicUsize::new(0);
        const BLOCK: usize = 256;
        let failed: Vec<String> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..threads.max(1))
                .map(|_| {
                    s.spawn(|| -> Result<(), String> {
                        loop {
                            let lo = next.fetch_add(BLOCK, Ordering::Relaxed);
                            if lo >= tokens.len() {
                                return Ok(());
                            }
                            let hi = (lo + BLOCK).min(tokens.len());
                            let z = model
                                .ad_vectors(&tokens[lo..hi])
                                .map_err(|e| e.to_string())?;
                            for (i, row) in (lo..hi).zip(z.chunks_exact(d)) {
                                index
                                    .insert_with_payload(i as u64, row, &tokens[i].to_payload())
                                    .map_err(|e| e.to_string())?;
                            }
                        }
                    })
                })
                .collect();
            workers
                .into_iter()
                .filter_map(|w| match w.join() {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(e),
                    Err(_) => Some("an indexing thread panicked".into()),
                })
                .collect()
        });
        if let Some(e) = failed.into_iter().next() {
            return Err(e);
        }
        Ok(Self {
            scorer: BarScorer::new(Arc::clone(&model)),
            params: BeamParams::default().layers(layers).top(top),
            model,
            market,
            index: Arc::new(index),
        })
    }
}

/// The campaign's ad in the BAR index: a new key with the profile (item,
/// category, brand, aBid) of a market ad, and the fixed requests whose
/// retrievals it is tracked on.
pub struct Campaign {
    /// Its key (the market's ads use `0..ads`).
    pub key: u64,
    /// The market ad it copies.
    pub base_ad: usize,
    /// Profile and base bid: `bid_constraint` here is the constraint at
    /// `alpha = CPA target`.
    pub base: AdFeatures,
    /// The fixed requests (users).
    pub users: Vec<usize>,
    states: Vec<UserState>,
}

impl Campaign {
    /// A campaign ad copying market ad `base_ad` and the first `requests`
    /// users (in a fixed pseudo-random order) with the ad's category among
    /// their interests: the requests its reach is counted on.
    pub fn new(world: &BarWorld, base_ad: usize, requests: usize) -> Result<Self, String> {
        let market = &world.market;
        let ad = market.ads().get(base_ad).ok_or(format!(
            "--ad {base_ad}: the market has {} ads",
            market.ads().len()
        ))?;
        let base = AdFeatures {
            bid: BidFeatures {
                // The simulator's campaign has a CPA target: OCPC.
                bid_type: 0,
                ..ad.features.bid
            },
            ..ad.features
        };
        let users_n = market.users().len();
        let mut users = Vec::new();
        // A fixed permutation of the users (odd multiplier mod n).
        let step = (0..)
            .map(|k| 7919 + 2 * k)
            .find(|s| gcd(*s, users_n) == 1)
            .unwrap_or(1);
        for j in 0..users_n {
            let u = (j * step + 17) % users_n;
            if market.users()[u]
                .interests
                .iter()
                .any(|&(c, _)| c == base.cate)
            {
                users.push(u);
                if users.len() == requests {
                    break;
                }
            }
        }
        if users.is_empty() {
            return Err(format!(
                "no user is interested in the category of ad {base_ad}"
            ));
        }
        let states = users
            .iter()
            .map(|&u| world.model.user_side(&market.users()[u].features))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            key: market.ads().len() as u64,
            base_ad,
            base,
            users,
            states,
        })
    }

    /// The ad's features at a tick: the bid coefficient (in CPA targets)
    /// scales the constraint (a higher bid per conversion is a looser KPI
    /// constraint), the budget and time left are the campaign's.
    pub fn features(&self, alpha_ratio: f64, budget_left: f64, time_left: f64) -> AdFeatures {
        AdFeatures {
            bid: BidFeatures {
                bid_constraint: (self.base.bid.bid_constraint as f64 * alpha_ratio.max(0.0)) as f32,
                budget_left_ratio: budget_left.clamp(0.0, 1.0) as f32,
                time_left_ratio: time_left.clamp(0.0, 1.0) as f32,
                ..self.base.bid
            },
            ..self.base
        }
    }

    /// The ad's rank (1 = best) in each fixed request's retrieval, `None`
    /// where it is not retrieved.
    pub fn ranks(&self, world: &BarWorld) -> Result<Vec<Option<u32>>, String> {
        self.states
            .iter()
            .map(|user| {
                let hits = world
                    .index
                    .search_with(&world.scorer, user, &world.params)
                    .map_err(|e| e.to_string())?;
                Ok(hits
                    .iter()
                    .find(|h| h.key == self.key)
                    .map(|hit| 1 + hits.iter().filter(|h| h.score > hit.score).count() as u32))
            })
            .collect()
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// One tick of a day.
#[derive(Debug, Clone, Copy)]
pub struct Tick {
    /// The executed bid coefficient (0 once the budget is spent).
    pub alpha: f64,
    /// Cost in the tick.
    pub cost: f64,
    /// Cost so far, this tick included.
    pub cum_cost: f64,
    /// The budget curve: budget x the expected traffic share of the day so
    /// far, this tick included (spending in proportion to traffic).
    pub curve: f64,
    /// True conversions in the tick.
    pub conversions: u32,
    /// The features pushed for the campaign ad.
    pub bid: BidFeatures,
    /// Their tokens in the index's payload after the push: constraint,
    /// budget and time buckets.
    pub buckets: [u32; 3],
    /// L2 distance between the ad's index vector before and after.
    pub moved: f32,
    /// The index holds exactly the model's ad side of the pushed features.
    pub in_sync: bool,
    /// Fixed requests retrieving the ad after the push.
    pub reach: usize,
    /// Its median rank over the fixed requests (`None`: not retrieved by
    /// half of them or more).
    pub median_rank: Option<u32>,
    /// Event-to-searchable latency of the push.
    pub latency: Duration,
}

/// A day played by one policy.
#[derive(Debug, Clone)]
pub struct Day {
    pub policy: String,
    pub budget: f64,
    pub cpa_target: f64,
    pub ticks: Vec<Tick>,
    pub cost: f64,
    pub conversions: u64,
    pub score: f64,
    /// Pushes applied / failed by the near-line updater.
    pub applied: u64,
    pub failed: u64,
}

/// A policy whose every action is also pushed to the live index.
struct Pushing<'a, P> {
    inner: P,
    world: &'a BarWorld,
    campaign: &'a Campaign,
    updater: &'a NearlineUpdater,
    share: Vec<f64>,
    pushes: Vec<Tick>,
    error: Option<String>,
}

impl<P: Policy> Pushing<'_, P> {
    fn push(&mut self, obs: &Observation<'_>, alpha: f64) -> Result<Tick, String> {
        let executed = if obs.remaining < MIN_BUDGET || !alpha.is_finite() {
            0.0
        } else {
            alpha.max(0.0)
        };
        let features = self.campaign.features(
            executed / obs.cpa_target,
            obs.remaining / obs.budget,
            obs.state.time_left,
        );
        let key = self.campaign.key;
        let index = &self.world.index;
        let before = index.get(key).map_err(|e| e.to_string())?;
        self.updater
            .send(key, features)
            .map_err(|e| e.to_string())?;
        self.updater.flush();
        let latency = self
            .updater
            .report(true)
            .latencies
            .last()
            .copied()
            .unwrap_or_default();
        let (after, payload) = index.get_with_payload(key).map_err(|e| e.to_string())?;
        let side = self
            .world
            .model
            .ad_side(&features)
            .map_err(|e| e.to_string())?;
        let in_sync = after == side.vector && payload == side.tokens.to_payload();
        let ids = side.tokens.ids();
        let moved = before
            .iter()
            .zip(&after)
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f32>()
            .sqrt();
        let mut ranks = self.campaign.ranks(self.world)?;
        let reach = ranks.iter().flatten().count();
        // Not retrieved sorts last.
        ranks.sort_by_key(|r| r.unwrap_or(u32::MAX));
        let median_rank = ranks.get(ranks.len() / 2).copied().flatten();
        let curve_share: f64 = self.share.iter().take(obs.tick + 1).sum();
        Ok(Tick {
            alpha: executed,
            cost: 0.0,
            cum_cost: 0.0,
            curve: obs.budget * curve_share,
            conversions: 0,
            bid: features.bid,
            buckets: [ids[CONSTRAINT_TOKEN], ids[BUDGET_TOKEN], ids[TIME_TOKEN]],
            moved,
            in_sync,
            reach,
            median_rank,
            latency,
        })
    }
}

impl<P: Policy> Policy for Pushing<'_, P> {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn begin_day(&mut self, day: &DayContext<'_>) {
        self.share = day.traffic_share.to_vec();
        self.pushes.clear();
        self.inner.begin_day(day);
    }
    fn act(&mut self, obs: &Observation<'_>) -> f64 {
        let alpha = self.inner.act(obs);
        if self.error.is_none() {
            match self.push(obs, alpha) {
                Ok(tick) => self.pushes.push(tick),
                Err(e) => self.error = Some(e),
            }
        }
        alpha
    }
}

/// Plays the day of `seed` under `sim` with `policy` bidding for
/// `sim.agent`, pushing every tick's bid to the campaign ad through a
/// near-line updater. The ad starts the day at its start-of-day bid
/// (`alpha` = CPA target, full budget and time), whatever the last day
/// left in the index.
pub fn play_day(
    sim: &SimConfig,
    seed: u64,
    policy: impl Policy,
    world: &BarWorld,
    campaign: &Campaign,
) -> Result<Day, String> {
    let updater = NearlineUpdater::spawn(
        Arc::clone(&world.index),
        Arc::clone(&world.model),
        NearlineOptions::default(),
    )
    .map_err(|e| e.to_string())?;
    updater
        .send(campaign.key, campaign.features(1.0, 1.0, 1.0))
        .map_err(|e| e.to_string())?;
    updater.flush();
    updater.report(true);
    let name = policy.name().to_string();
    let mut pushing = Pushing {
        inner: policy,
        world,
        campaign,
        updater: &updater,
        share: Vec::new(),
        pushes: Vec::new(),
        error: None,
    };
    let log = run_episode(sim, seed, &mut pushing).map_err(|e| e.to_string())?;
    if let Some(e) = pushing.error {
        return Err(format!("near-line push: {e}"));
    }
    let mut ticks = pushing.pushes;
    let mut cum = 0.0;
    for (tick, record) in ticks.iter_mut().zip(log.records_of(log.agent)) {
        cum += record.cost;
        tick.cost = record.cost;
        tick.cum_cost = cum;
        tick.conversions = record.conversions;
        tick.alpha = record.action;
    }
    let report = updater.shutdown();
    let agent = log.agent_outcome();
    Ok(Day {
        policy: name,
        budget: agent.budget,
        cpa_target: agent.cpa_target,
        ticks,
        cost: agent.cost,
        conversions: agent.conversions,
        score: agent.score,
        // The start-of-day reset is one of the applied updates.
        applied: report.applied,
        failed: report.failed,
    })
}

/// Writes the day's PNG to `path`: cumulative spend against the budget
/// curve, the bid coefficient, and the campaign ad's reach in the index,
/// per tick, for each day (first red, second blue). Text is drawn with the
/// vendored DejaVu Sans subset (`fonts/`), so no system font is needed.
pub fn plot(
    path: &std::path::Path,
    days: &[&Day],
    requests: usize,
    title: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    use plotters::style::{register_font, FontStyle};

    static FONT: &[u8] = include_bytes!("fonts/DejaVuSans-ascii.ttf");
    register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| "the vendored font does not parse")?;
    let colours = [RGBColor(214, 39, 40), RGBColor(31, 119, 180)];
    let Some(first) = days.first() else {
        return Ok(());
    };
    let ticks = first.ticks.len();
    let root = BitMapBackend::new(path, (1000, 1000)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, rest) = root.split_vertically(500);
    let (middle, bottom) = rest.split_vertically(250);
    let x_range = 0f64..ticks as f64;

    // Cumulative spend against the budget curve.
    let y_max = first.budget * 1.08;
    let mut chart = ChartBuilder::on(&top)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(x_range.clone(), 0f64..y_max)?;
    chart
        .configure_mesh()
        .x_desc("tick")
        .y_desc("cumulative spend")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()?;
    chart
        .draw_series(LineSeries::new(
            [(0.0, first.budget), (ticks as f64, first.budget)],
            ShapeStyle::from(&RGBColor(150, 150, 150)).stroke_width(1),
        ))?
        .label(format!("budget {:.0}", first.budget))
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RGBColor(150, 150, 150)));
    let curve = std::iter::once((0.0, 0.0)).chain(
        first
            .ticks
            .iter()
            .enumerate()
            .map(|(t, k)| ((t + 1) as f64, k.curve)),
    );
    chart
        .draw_series(DashedLineSeries::new(
            curve,
            8,
            5,
            ShapeStyle::from(&BLACK).stroke_width(2),
        ))?
        .label("budget curve (spend in step with traffic)")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.stroke_width(2)));
    for (day, &colour) in days.iter().zip(&colours) {
        let points = std::iter::once((0.0, 0.0)).chain(
            day.ticks
                .iter()
                .enumerate()
                .map(|(t, k)| ((t + 1) as f64, k.cum_cost)),
        );
        chart
            .draw_series(LineSeries::new(points, colour.stroke_width(2)))?
            .label(format!(
                "{}: spend {:.0}, {} conversions, score {:.2}",
                day.policy.to_uppercase(),
                day.cost,
                day.conversions,
                day.score
            ))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], colour.stroke_width(3)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(200, 200, 200))
        .draw()?;

    // The bid coefficient, on a log scale (a pacer whose budget is gone
    // keeps raising it; 0 is drawn at the bottom).
    const A_MIN: f64 = 0.05;
    let a_max = days
        .iter()
        .flat_map(|d| d.ticks.iter().map(|k| k.alpha / d.cpa_target))
        .fold(2.0f64, f64::max)
        * 1.2;
    let mut chart = ChartBuilder::on(&middle)
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(x_range.clone(), (A_MIN..a_max).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("tick")
        .y_desc("alpha / CPA target")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y}"))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()?;
    chart.draw_series(LineSeries::new(
        [(0.0, 1.0), (ticks as f64, 1.0)],
        RGBColor(150, 150, 150),
    ))?;
    for (day, &colour) in days.iter().zip(&colours) {
        chart.draw_series(LineSeries::new(
            day.ticks
                .iter()
                .enumerate()
                .map(|(t, k)| (t as f64 + 0.5, (k.alpha / day.cpa_target).max(A_MIN))),
            colour.stroke_width(2),
        ))?;
    }

    // Reach of the campaign ad in the live index.
    let mut chart = ChartBuilder::on(&bottom)
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(x_range, 0f64..requests.max(1) as f64 * 1.05)?;
    chart
        .configure_mesh()
        .x_desc("tick")
        .y_desc(format!("ad retrieved (of {requests})"))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()?;
    for (day, &colour) in days.iter().zip(&colours) {
        chart.draw_series(LineSeries::new(
            day.ticks
                .iter()
                .enumerate()
                .map(|(t, k)| (t as f64 + 0.5, k.reach as f64)),
            colour.stroke_width(2),
        ))?;
    }
    root.present()?;
    Ok(())
}
