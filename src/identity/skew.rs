//! Clock skew against AWS, read from the `Date` header of STS responses.
//!
//! RDS checks a token's X-Amz-Date against its own clock; a token signed on
//! a host whose clock is off is refused with an opaque "PAM authentication
//! failed". The SDK corrects its own requests for skew, but tokens are
//! signed with this host's clock, so the proxy measures the skew and says so.

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::interceptors::context::BeforeDeserializationInterceptorContextRef;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;
use aws_smithy_types::date_time::{DateTime, Format};

/// Skew beyond which tokens risk refusal (SigV4 allows 5 minutes; warn well
/// before that).
pub const WARN_SKEW_SECS: i64 = 60;

/// The last measured skew, AWS minus local, in seconds.
#[derive(Debug, Clone, Default)]
pub struct SkewProbe(Arc<Mutex<Option<i64>>>);

impl SkewProbe {
    pub fn skew_secs(&self) -> Option<i64> {
        *self.0.lock().expect("lock poisoned")
    }

    /// The skew when it is large enough to matter.
    pub fn significant(&self) -> Option<i64> {
        self.skew_secs().filter(|s| s.abs() > WARN_SKEW_SECS)
    }

    fn record(&self, date: &str, now: SystemTime) {
        if let Some(skew) = skew_from_date(date, now) {
            *self.0.lock().expect("lock poisoned") = Some(skew);
        }
    }
}

/// `Date` header (HTTP date) minus `now`, in whole seconds.
pub fn skew_from_date(date: &str, now: SystemTime) -> Option<i64> {
    let server = DateTime::from_str(date, Format::HttpDate).ok()?;
    let local = DateTime::from(now);
    Some(server.secs() - local.secs())
}

/// Describes a skew for people.
pub fn describe(skew: i64) -> String {
    if skew > 0 {
        format!("this host's clock is {skew} s behind AWS")
    } else {
        format!("this host's clock is {} s ahead of AWS", -skew)
    }
}

impl Intercept for SkewProbe {
    fn name(&self) -> &'static str {
        "ClockSkewProbe"
    }

    fn read_before_deserialization(
        &self,
        context: &BeforeDeserializationInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        if let Some(date) = context.response().headers().get("date") {
            self.record(date, SystemTime::now());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn skew_from_http_date() {
        // Thu, 26 Nov 2026 14:02:00 GMT
        let server = UNIX_EPOCH + Duration::from_secs(1_795_701_720);
        let date = "Thu, 26 Nov 2026 14:02:00 GMT";
        assert_eq!(skew_from_date(date, server), Some(0));
        assert_eq!(
            skew_from_date(date, server - Duration::from_secs(400)),
            Some(400)
        );
        assert_eq!(skew_from_date("yesterday", server), None);
        let p = SkewProbe::default();
        p.record(date, server + Duration::from_secs(90));
        assert_eq!(p.significant(), Some(-90));
        assert_eq!(describe(-90), "this host's clock is 90 s ahead of AWS");
    }
}
