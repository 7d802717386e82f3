//! One PV's generalised second-price auction over 3 slots, and exposure.

/// Number of ad slots per PV.
pub const SLOTS: usize = 3;

/// A won slot.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlotWin {
    /// The winning advertiser.
    pub advertiser: u32,
    /// Its bid.
    pub bid: f64,
    /// The price it pays if the slot is shown: the next-highest bid.
    pub price: f64,
}

/// The outcome of one PV's auction.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Gsp {
    /// Slot `k` (0 = top); `None` when unsold.
    pub slots: [Option<SlotWin>; SLOTS],
    /// The four highest bids with their bidders, highest first (ties broken
    /// by the lower advertiser index); bids of 0 are not listed.
    pub top: [Option<(u32, f64)>; SLOTS + 1],
}

impl Gsp {
    /// Runs the auction: the `k`-th highest positive bid wins slot `k` and
    /// pays the `(k+1)`-th highest bid, floored at `reserve`; a slot whose
    /// price would be the reserve (the next bid is at or below it) is unsold,
    /// as in AuctionNet.
    pub fn run(bids: &[f64], reserve: f64) -> Self {
        let mut top: [Option<(u32, f64)>; SLOTS + 1] = [None; SLOTS + 1];
        for (i, &b) in bids.iter().enumerate() {
            if b <= 0.0 {
                continue;
            }
            // Insert into the sorted top-4 (strictly greater moves up, so the
            // lower index wins ties).
            let mut cand = (i as u32, b);
            for slot in top.iter_mut() {
                match slot {
                    None => {
                        *slot = Some(cand);
                        break;
                    }
                    Some(cur) if cand.1 > cur.1 => std::mem::swap(cur, &mut cand),
                    Some(_) => {}
                }
            }
        }
        let mut slots = [None; SLOTS];
        for k in 0..SLOTS {
            let Some((advertiser, bid)) = top[k] else {
                break;
            };
            let next = top[k + 1].map_or(0.0, |(_, b)| b);
            let price = next.max(reserve);
            if price > reserve && price <= bid {
                slots[k] = Some(SlotWin {
                    advertiser,
                    bid,
                    price,
                });
            }
        }
        Self { slots, top }
    }

    /// The price advertiser `i` would have had to beat to win any slot
    /// (AuctionNet's `leastWinningCost`, seen from `i`): the third-highest
    /// bid among the others.
    pub fn least_winning_cost(&self, i: u32) -> f64 {
        let in_top3 = self.top[..SLOTS].iter().flatten().any(|&(a, _)| a == i);
        let idx = if in_top3 { SLOTS } else { SLOTS - 1 };
        self.top[idx].map_or(0.0, |(_, b)| b)
    }
}

/// Whether slot `k` is shown, from two uniforms of the PV. Marginals are
/// `exposure[k]` exactly, and the slots are nested: slot 2 is shown iff
/// `u2 < exposure[1]`, slot 3 iff slot 2 is and `u3 < exposure[2] /
/// exposure[1]` (AuctionNet: "if slot 2 is not shown, slot 3 is not shown").
pub fn exposed(k: usize, exposure: &[f64; SLOTS], u1: f64, u2: f64, u3: f64) -> bool {
    match k {
        0 => u1 < exposure[0],
        1 => u2 < exposure[1],
        _ => u2 < exposure[1] && u3 * exposure[1] < exposure[2],
    }
}
