//! Drawing priced usage down from a customer's grants: pure arithmetic, no I/O.

use chrono::{DateTime, TimeDelta, Utc};
use rust_decimal::{Decimal, RoundingStrategy};

/// An open grant, in draw order, with what is left of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OpenGrant {
    pub(crate) grant_id: i64,
    pub(crate) remaining: Decimal,
    pub(crate) effective_at: DateTime<Utc>,
    pub(crate) expires_at: Option<DateTime<Utc>>,
}

impl OpenGrant {
    /// Usage of a minute window may draw from a grant in effect at some point of the window:
    /// it took effect before the window ended, and expires after it started.
    fn covers(&self, window_start: DateTime<Utc>) -> bool {
        self.effective_at < window_start + TimeDelta::minutes(1)
            && self.expires_at.is_none_or(|at| window_start < at)
    }
}

/// One window's usage to burn, priced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PricedUsage {
    pub(crate) meter: String,
    pub(crate) group_key: String,
    pub(crate) window_start: DateTime<Utc>,
    pub(crate) quantity: Decimal,
    pub(crate) credits_per_unit: Decimal,
}

/// One `consume` entry: `credits` drawn from a grant (`None`: no grant covered them) for
/// `quantity` of the usage at `usage` (an index into the usage given).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Draw {
    pub(crate) usage: usize,
    pub(crate) grant_id: Option<i64>,
    pub(crate) credits: Decimal,
    pub(crate) quantity: Decimal,
}

/// Draws each usage, oldest window first as given, from the first grants (in draw order) that
/// cover its window, splitting it across grants as they run out; what no grant covers is one
/// draw without a grant. `grants` are left with what remains. The quantities of a usage's
/// draws add up to its quantity exactly, and their credits to quantity × rate exactly.
/// `None` when a cost is beyond a 28-digit decimal.
pub(crate) fn draw(grants: &mut [OpenGrant], usage: &[PricedUsage]) -> Option<Vec<Draw>> {
    let mut draws = Vec::new();
    for (index, item) in usage.iter().enumerate() {
        let cost = item.quantity.checked_mul(item.credits_per_unit)?;
        if cost.is_zero() {
            continue;
        }
        let mut left = cost;
        let mut quantity_left = item.quantity;
        for grant in grants.iter_mut() {
            if left.is_zero() {
                break;
            }
            if grant.remaining.is_zero() || !grant.covers(item.window_start) {
                continue;
            }
            let take = left.min(grant.remaining);
            grant.remaining -= take;
            left -= take;
            // The usage this share paid for; the last share takes the rest, so the shares
            // add up to the window's quantity exactly.
            let quantity = if left.is_zero() {
                quantity_left
            } else {
                take.checked_div(item.credits_per_unit)?
                    .round_dp_with_strategy(9, RoundingStrategy::ToZero)
                    .min(quantity_left)
            };
            quantity_left -= quantity;
            draws.push(Draw {
                usage: index,
                grant_id: Some(grant.grant_id),
                credits: take,
                quantity,
            });
        }
        if !left.is_zero() {
            draws.push(Draw {
                usage: index,
                grant_id: None,
                credits: left,
                quantity: quantity_left,
            });
        }
    }
    Some(draws)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at(minute: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + minute * 60, 0).unwrap()
    }

    fn grant(id: i64, remaining: i64, from: i64, until: Option<i64>) -> OpenGrant {
        OpenGrant {
            grant_id: id,
            remaining: Decimal::from(remaining),
            effective_at: at(from),
            expires_at: until.map(at),
        }
    }

    fn usage(minute: i64, quantity: &str, rate: &str) -> PricedUsage {
        PricedUsage {
            meter: "tokens".into(),
            group_key: String::new(),
            window_start: at(minute),
            quantity: quantity.parse().unwrap(),
            credits_per_unit: rate.parse().unwrap(),
        }
    }

    #[test]
    fn grants_are_drawn_in_order_and_split_when_one_runs_out() {
        let mut grants = [grant(1, 3, 0, None), grant(2, 10, 0, None)];
        let draws = draw(&mut grants, &[usage(5, "5120", "0.001")]).unwrap();
        let d = |s: &str| s.parse::<Decimal>().unwrap();
        assert_eq!(
            draws,
            vec![
                Draw {
                    usage: 0,
                    grant_id: Some(1),
                    credits: d("3"),
                    quantity: d("3000")
                },
                Draw {
                    usage: 0,
                    grant_id: Some(2),
                    credits: d("2.12"),
                    quantity: d("2120")
                },
            ]
        );
        assert_eq!(grants[0].remaining, d("0"));
        assert_eq!(grants[1].remaining, d("7.88"));
    }

    #[test]
    fn what_no_grant_covers_is_one_uncovered_draw() {
        let mut grants = [grant(1, 2, 0, None)];
        let draws = draw(&mut grants, &[usage(5, "7", "1")]).unwrap();
        assert_eq!(draws[1].grant_id, None);
        assert_eq!(draws[1].credits, Decimal::from(5));
        assert_eq!(draws[1].quantity, Decimal::from(5));
    }

    #[test]
    fn a_grant_covers_windows_it_was_in_effect_for() {
        // In effect from minute 10 (30 s into a window counts), expires at minute 20.
        let mut grants = [OpenGrant {
            effective_at: at(10) + TimeDelta::seconds(30),
            ..grant(1, 100, 0, Some(20))
        }];
        let items = [
            usage(9, "1", "1"),
            usage(10, "1", "1"),
            usage(19, "1", "1"),
            usage(20, "1", "1"),
        ];
        let draws = draw(&mut grants, &items).unwrap();
        let covered: Vec<(usize, Option<i64>)> =
            draws.iter().map(|d| (d.usage, d.grant_id)).collect();
        assert_eq!(
            covered,
            vec![(0, None), (1, Some(1)), (2, Some(1)), (3, None)]
        );
    }

    #[test]
    fn free_usage_and_cost_overflow() {
        let mut grants = [grant(1, 1, 0, None)];
        assert_eq!(draw(&mut grants, &[usage(1, "5", "0")]).unwrap(), vec![]);
        let huge = PricedUsage {
            quantity: Decimal::MAX,
            ..usage(1, "1", "2")
        };
        assert_eq!(draw(&mut grants, &[huge]), None);
    }

    proptest! {
        #[test]
        fn draws_account_for_every_credit_and_unit(
            remaining in proptest::collection::vec(0u32..5_000, 0..5),
            quantities in proptest::collection::vec((1u64..10_000_000, 0u32..4), 1..6),
            rate_thousandths in 1u32..5_000,
        ) {
            let rate = Decimal::new(rate_thousandths.into(), 3);
            let mut grants: Vec<OpenGrant> = remaining.iter().enumerate()
                .map(|(i, r)| grant(i as i64, i64::from(*r), 0, None)).collect();
            let before: Decimal = grants.iter().map(|g| g.remaining).sum();
            let items: Vec<PricedUsage> = quantities.iter()
                .map(|(q, scale)| PricedUsage { quantity: Decimal::new(*q as i64, *scale), ..usage(1, "0", "0") })
                .map(|u| PricedUsage { credits_per_unit: rate, ..u })
                .collect();
            let draws = draw(&mut grants, &items).unwrap();
            let after: Decimal = grants.iter().map(|g| g.remaining).sum();
            for (index, item) in items.iter().enumerate() {
                let mine: Vec<&Draw> = draws.iter().filter(|d| d.usage == index).collect();
                prop_assert_eq!(mine.iter().map(|d| d.quantity).sum::<Decimal>(), item.quantity);
                prop_assert_eq!(mine.iter().map(|d| d.credits).sum::<Decimal>(), item.quantity * rate);
                prop_assert!(mine.iter().all(|d| d.quantity >= Decimal::ZERO && d.credits > Decimal::ZERO));
            }
            let from_grants: Decimal = draws.iter().filter(|d| d.grant_id.is_some()).map(|d| d.credits).sum();
            prop_assert_eq!(before - after, from_grants);
            prop_assert!(grants.iter().all(|g| g.remaining >= Decimal::ZERO));
        }
    }
}
