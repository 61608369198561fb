//! The decision itself: a limit, the usage so far and the quantity asked for give
//! [`Decision`]. Pure arithmetic, no state and no I/O.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use tally_billing::plan::{Enforcement, LimitDefinition};

/// The answer to "may this customer use `quantity` more of `meter`?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Within the limit (or no limit: `limit` is `None`).
    Allow {
        used: Decimal,
        limit: Option<Decimal>,
        remaining: Option<Decimal>,
        resets_at: Option<DateTime<Utc>>,
        /// For a meter with `credits` enforcement: the projected credit balance left after
        /// this quantity.
        credits: Option<Decimal>,
    },
    /// Allowed, but above the limit (`soft`), or within the grace (`grace`).
    Warn {
        used: Decimal,
        limit: Decimal,
        resets_at: Option<DateTime<Utc>>,
        enforcement: Enforcement,
        /// As for `Allow`.
        credits: Option<Decimal>,
    },
    /// Denied: above a `hard` limit or beyond the grace.
    Deny {
        used: Decimal,
        limit: Decimal,
        resets_at: Option<DateTime<Utc>>,
    },
}

impl Decision {
    /// The usage the decision was made on, whatever it decided.
    pub fn used(&self) -> Decimal {
        match self {
            Decision::Allow { used, .. }
            | Decision::Warn { used, .. }
            | Decision::Deny { used, .. } => *used,
        }
    }

    /// The same decision, saying what credit balance is left.
    pub(crate) fn with_credits(mut self, left: Decimal) -> Decision {
        match &mut self {
            Decision::Allow { credits, .. } | Decision::Warn { credits, .. } => {
                *credits = Some(left)
            }
            Decision::Deny { .. } => {}
        }
        self
    }
}

/// The decision for `quantity` more on top of `used`; `None` when `used + quantity` is beyond
/// a decimal's range.
pub fn decide(
    limit: &LimitDefinition,
    used: Decimal,
    quantity: Decimal,
    resets_at: Option<DateTime<Utc>>,
) -> Option<Decision> {
    if limit.is_unlimited() {
        return Some(Decision::Allow {
            used,
            limit: None,
            remaining: None,
            resets_at,
            credits: None,
        });
    }
    let projected = used.checked_add(quantity)?;
    if projected <= limit.limit {
        return Some(Decision::Allow {
            used,
            limit: Some(limit.limit),
            remaining: Some(limit.limit.checked_sub(projected)?),
            resets_at,
            credits: None,
        });
    }
    Some(match limit.deny_above() {
        Some(ceiling) if projected > ceiling => Decision::Deny {
            used,
            limit: limit.limit,
            resets_at,
        },
        _ => Decision::Warn {
            used,
            limit: limit.limit,
            resets_at,
            enforcement: limit.enforcement,
            credits: None,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_billing::plan::Period;

    fn limit(value: i64, enforcement: Enforcement, grace: i64) -> LimitDefinition {
        LimitDefinition {
            limit: Decimal::from(value),
            period: Period::Day,
            enforcement,
            grace_percent: Decimal::from(grace),
            unit_price: None,
        }
    }

    fn kind(decision: &Decision) -> &'static str {
        match decision {
            Decision::Allow { .. } => "allow",
            Decision::Warn { .. } => "warn",
            Decision::Deny { .. } => "deny",
        }
    }

    #[test]
    fn every_mode_below_at_and_above_its_limit() {
        let n = Decimal::from;
        let cases = [
            (
                limit(100, Enforcement::Hard, 0),
                [("allow", 98), ("allow", 99), ("deny", 100)],
            ),
            (
                limit(100, Enforcement::Soft, 0),
                [("allow", 98), ("allow", 99), ("warn", 100)],
            ),
            (
                limit(100, Enforcement::Grace, 10),
                [("allow", 99), ("warn", 105), ("deny", 110)],
            ),
        ];
        for (limit, checks) in cases {
            for (expected, used) in checks {
                let decision = decide(&limit, n(used), n(1), None).unwrap();
                assert_eq!(
                    kind(&decision),
                    expected,
                    "{:?} used {used}",
                    limit.enforcement
                );
            }
        }
        let at_limit = decide(&limit(100, Enforcement::Hard, 0), n(99), n(1), None).unwrap();
        assert_eq!(
            at_limit,
            Decision::Allow {
                used: n(99),
                limit: Some(n(100)),
                remaining: Some(n(0)),
                resets_at: None,
                credits: None,
            }
        );
        let grace_edge = decide(&limit(100, Enforcement::Grace, 10), n(109), n(1), None).unwrap();
        assert_eq!(
            kind(&grace_edge),
            "warn",
            "exactly limit × 1.1 is still within the grace"
        );
        assert_eq!(
            kind(&decide(&limit(-1, Enforcement::Hard, 0), n(1_000_000), n(1), None).unwrap()),
            "allow"
        );
    }

    #[test]
    fn usage_beyond_a_decimal_is_no_decision_not_a_panic() {
        let hard = limit(100, Enforcement::Hard, 0);
        assert_eq!(decide(&hard, Decimal::MAX, Decimal::ONE, None), None);
        let huge_grace = LimitDefinition {
            limit: Decimal::MAX,
            grace_percent: Decimal::from(50),
            ..limit(0, Enforcement::Grace, 0)
        };
        assert_eq!(huge_grace.deny_above(), None);
    }
}
