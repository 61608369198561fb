//! Reading Postgres `numeric` into exact decimals without ever panicking.
//!
//! Postgres adds usage exactly, with no upper bound; a `Decimal` holds 28 digits. sqlx's own
//! decoding of a `numeric` that does not fit multiplies with a panicking operator, so one
//! customer's enormous sum would kill the process that reads it. [`ExactDecimal`] decodes the
//! same wire format with checked arithmetic: a value that fits comes back exactly (with its
//! display scale), one that does not is a decode error for that query, which the caller treats
//! as the failure of that one customer's data ([`crate::is_data_error`]).

use rust_decimal::Decimal;
use sqlx::decode::Decode;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgTypeInfo, PgValueFormat, PgValueRef, Postgres};
use sqlx::types::Type;

/// A `numeric` read exactly, or refused with an error when it does not fit a [`Decimal`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ExactDecimal(pub Decimal);

impl From<ExactDecimal> for Decimal {
    fn from(value: ExactDecimal) -> Decimal {
        value.0
    }
}

impl Type<Postgres> for ExactDecimal {
    fn type_info() -> PgTypeInfo {
        <Decimal as Type<Postgres>>::type_info()
    }
}

impl<'r> Decode<'r, Postgres> for ExactDecimal {
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        match value.format() {
            PgValueFormat::Binary => decode_binary(value.as_bytes()?).map(ExactDecimal),
            PgValueFormat::Text => {
                let text = value.as_str()?;
                Decimal::from_str_exact(text)
                    .map(ExactDecimal)
                    .map_err(|_| out_of_range(text))
            }
        }
    }
}

fn out_of_range(what: impl std::fmt::Display) -> BoxDynError {
    format!("numeric {what} does not fit a 28-digit decimal exactly").into()
}

/// The binary `numeric` format: `ndigits`, `weight`, `sign`, `dscale` (each 16 bits, big
/// endian), then `ndigits` base-10,000 digits; the value is Σ digit[i] × 10000^(weight − i).
fn decode_binary(bytes: &[u8]) -> Result<Decimal, BoxDynError> {
    let word = |i: usize| -> Result<u16, BoxDynError> {
        bytes
            .get(i * 2..i * 2 + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or_else(|| "truncated numeric".into())
    };
    let ndigits = usize::from(word(0)?);
    let weight = i64::from(word(1)? as i16);
    let sign = word(2)?;
    let dscale = u32::from(word(3)?);
    let negative = match sign {
        0x0000 => false,
        0x4000 => true,
        _ => return Err("numeric is NaN or infinite; a decimal cannot hold it".into()),
    };
    // The digits as one integer, then a power of ten: value = mantissa × 10^exponent.
    let mut mantissa: i128 = 0;
    for i in 0..ndigits {
        let digit = i128::from(word(4 + i)?);
        mantissa = mantissa
            .checked_mul(10_000)
            .and_then(|m| m.checked_add(digit))
            .ok_or_else(|| out_of_range("with more than 38 digits"))?;
    }
    if mantissa == 0 {
        return Ok(Decimal::ZERO);
    }
    let mut exponent = 4 * (weight - (ndigits as i64 - 1));
    while exponent > 0 {
        mantissa = mantissa
            .checked_mul(10)
            .ok_or_else(|| out_of_range("beyond 10^38"))?;
        exponent -= 1;
    }
    // Trailing zeros past the display scale carry nothing; drop them so the scale fits.
    while exponent < 0 && -exponent > i64::from(dscale) && mantissa % 10 == 0 {
        mantissa /= 10;
        exponent += 1;
    }
    let scale = u32::try_from(-exponent).map_err(|_| out_of_range("with a huge scale"))?;
    let mut value = Decimal::try_from_i128_with_scale(mantissa, scale)
        .map_err(|_| out_of_range(format!("{mantissa}e-{scale}")))?;
    // Show the scale Postgres shows (12.50 stays 12.50) when it still fits.
    if dscale > scale {
        let widened = 10i128
            .checked_pow(dscale - scale)
            .and_then(|p| mantissa.checked_mul(p))
            .and_then(|m| Decimal::try_from_i128_with_scale(m, dscale).ok());
        if let Some(widened) = widened {
            value = widened;
        }
    }
    value.set_sign_negative(negative);
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Encodes `text` the way Postgres sends a numeric (base-10,000 digits around the point).
    fn encode(text: &str) -> Vec<u8> {
        let (negative, text) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let (int, frac) = text.split_once('.').unwrap_or((text, ""));
        let dscale = frac.len();
        let int = int.trim_start_matches('0');
        let pad_left = (4 - int.len() % 4) % 4;
        let pad_right = (4 - frac.len() % 4) % 4;
        let digits: String = "0".repeat(pad_left) + int + frac + &"0".repeat(pad_right);
        let groups: Vec<u16> = digits
            .as_bytes()
            .chunks(4)
            .map(|c| std::str::from_utf8(c).unwrap().parse().unwrap())
            .collect();
        let int_groups = (pad_left + int.len()) / 4;
        let weight = int_groups as i16 - 1;
        // Postgres strips leading and trailing zero groups.
        let first = groups.iter().position(|&g| g != 0);
        let mut out = Vec::new();
        let (start, end, weight) = match first {
            None => (0, 0, 0),
            Some(first) => {
                let last = groups.iter().rposition(|&g| g != 0).unwrap();
                (first, last + 1, weight - first as i16)
            }
        };
        for word in [
            (end - start) as u16,
            weight as u16,
            if negative { 0x4000 } else { 0 },
            dscale as u16,
        ] {
            out.extend_from_slice(&word.to_be_bytes());
        }
        for g in &groups[start..end] {
            out.extend_from_slice(&g.to_be_bytes());
        }
        out
    }

    fn decode(text: &str) -> Result<String, String> {
        decode_binary(&encode(text))
            .map(|d| d.to_string())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn reads_what_fits_exactly_with_its_scale() {
        assert_eq!(decode("12.50").unwrap(), "12.50");
        assert_eq!(decode("0").unwrap(), "0");
        assert_eq!(decode("-0.000000001").unwrap(), "-0.000000001");
        assert_eq!(decode("10000").unwrap(), "10000");
        assert_eq!(
            decode("79228162514264337593543950335").unwrap(),
            "79228162514264337593543950335"
        );
        assert_eq!(
            decode("7922816251426433759354395.0335").unwrap(),
            "7922816251426433759354395.0335"
        );
    }

    #[test]
    fn refuses_what_does_not_fit_instead_of_panicking() {
        for text in [
            "79228162514264337593543950336",
            "1000000000000000000000000000000000000000000000000",
            "99999999999999999999999999999999999999999999.5",
            "0.00000000000000000000000000000001",
        ] {
            let error = decode(text).unwrap_err();
            assert!(error.contains("does not fit"), "{text}: {error}");
        }
        let nan = [0u8, 0, 0, 0, 0xC0, 0, 0, 0];
        assert!(decode_binary(&nan).is_err());
        assert!(decode_binary(&[0, 1]).is_err());
    }

    proptest! {
        #[test]
        fn never_panics_on_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_binary(&bytes);
        }

        #[test]
        fn round_trips_decimals(mantissa in any::<i64>(), scale in 0u32..=18) {
            let d = Decimal::new(mantissa, scale);
            prop_assert_eq!(decode(&d.to_string()).unwrap(), d.to_string());
        }
    }
}
