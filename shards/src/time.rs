//! RFC 3339 formatting of microsecond Unix timestamps, without a clock and without
//! chrono: the leader fixes every timestamp at proposal time, this module only prints it.

const US_PER_SECOND: i64 = 1_000_000;
const SECONDS_PER_DAY: i64 = 86_400;

/// Formats microseconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SS.ffffffZ` (UTC,
/// always six fractional digits), e.g. `2026-11-27T05:20:01.123456Z`.
///
/// Years outside 0000..=9999 (only reachable with absurd inputs) are printed with as
/// many digits as they need and a leading `-` when negative.
pub fn format_rfc3339_us(unix_us: i64) -> String {
    let seconds = unix_us.div_euclid(US_PER_SECOND);
    let micros = unix_us.rem_euclid(US_PER_SECOND);
    let days = seconds.div_euclid(SECONDS_PER_DAY);
    let second_of_day = seconds.rem_euclid(SECONDS_PER_DAY);
    let (year, month, day) = civil_from_days(days);
    let hour = second_of_day / 3600;
    let minute = second_of_day % 3600 / 60;
    let second = second_of_day % 60;
    format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{micros:06}Z")
}

/// Howard Hinnant's `civil_from_days`: days since 1970-01-01 → (year, month, day) in
/// the proleptic Gregorian calendar. Eras are 400-year cycles of 146097 days.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097); // [0, 146096]
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365; // [0, 399]
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100); // [0, 365]
    let month_from_march = (5 * day_of_year + 2) / 153; // [0, 11]
    let day = (day_of_year - (153 * month_from_march + 2) / 5 + 1) as u32; // [1, 31]
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    } as u32; // [1, 12]
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch() {
        assert_eq!(format_rfc3339_us(0), "1970-01-01T00:00:00.000000Z");
    }

    #[test]
    fn api_example() {
        // `date -u -d 2026-11-27T05:20:01Z +%s` = 1795756801
        assert_eq!(
            format_rfc3339_us(1_795_756_801 * US_PER_SECOND + 123_456),
            "2026-11-27T05:20:01.123456Z"
        );
    }

    #[test]
    fn leap_day_and_end_of_day() {
        assert_eq!(
            format_rfc3339_us(951_868_799 * US_PER_SECOND + 999_999),
            "2000-02-29T23:59:59.999999Z"
        );
        assert_eq!(
            format_rfc3339_us(951_868_800 * US_PER_SECOND),
            "2000-03-01T00:00:00.000000Z"
        );
    }

    #[test]
    fn before_epoch() {
        assert_eq!(format_rfc3339_us(-1), "1969-12-31T23:59:59.999999Z");
        assert_eq!(
            format_rfc3339_us(-2_203_891_200 * US_PER_SECOND),
            "1900-03-01T00:00:00.000000Z"
        );
    }

    #[test]
    fn last_second_of_year_9999() {
        assert_eq!(
            format_rfc3339_us(253_402_300_799 * US_PER_SECOND + 1),
            "9999-12-31T23:59:59.000001Z"
        );
    }

    #[test]
    fn extremes_do_not_panic() {
        let min = format_rfc3339_us(i64::MIN);
        let max = format_rfc3339_us(i64::MAX);
        assert!(min.ends_with('Z') && max.ends_with('Z'));
        assert!(min.starts_with('-'));
    }

    /// Every day of 1970..2100 follows the previous one in calendar order.
    #[test]
    fn consecutive_days_increase() {
        let mut previous = civil_from_days(-1);
        for days in 0..(130 * 366) {
            let current = civil_from_days(days);
            assert!(current > previous, "{days}: {previous:?} then {current:?}");
            previous = current;
        }
    }
}
