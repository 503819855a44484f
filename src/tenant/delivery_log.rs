//! The delivery log's line for one recipient's result, in Postfix's shape;
//! the ledger logs one per recipient per attempt.

use crate::base::names::MessageId;
use crate::outcome::Outcome;

/// One recipient's line in the delivery log (Postfix's shape):
/// `ID tenant=T to=<A> relay=R delay=1.5s status=deferred (why)`, and a
/// retry that may duplicate the message says so inside the parentheses.
pub struct DeliveryLine<'a> {
    pub id: &'a MessageId,
    pub tenant: &'a str,
    pub address: &'a str,
    pub relay: &'a str,
    /// Since the message was queued.
    pub delay_ms: u64,
    pub outcome: &'a Outcome,
}

impl std::fmt::Display for DeliveryLine<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let delay = self.delay_ms as f64 / 1000.0;
        write!(
            f,
            "{} tenant={} to=<{}> relay={} delay={delay:.1}s status={} ({}",
            self.id,
            self.tenant,
            self.address,
            self.relay,
            self.outcome.status(),
            self.outcome.reason()
        )?;
        if let Some(warning) = self.outcome.warning() {
            write!(f, "; {warning}")?;
        }
        f.write_str(")")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::names::MessageId;
    use crate::outcome::{self, Outcome};
    use crate::smtp::{Phase, SessionError};

    fn line(outcome: &Outcome) -> String {
        let id = MessageId::parse("0000ABCD").unwrap();
        DeliveryLine {
            id: &id,
            tenant: "acme",
            address: "a@x.test",
            relay: "relay.test[127.0.0.1]:25",
            delay_ms: 1_500,
            outcome,
        }
        .to_string()
    }

    #[test]
    fn the_delivery_log_says_a_retry_after_the_final_dot_may_duplicate_the_message() {
        let lost = outcome::of_session_error(&SessionError::Timeout(Phase::DataEnd)).outcome;
        assert_eq!(
            line(&lost),
            "0000ABCD tenant=acme to=<a@x.test> relay=relay.test[127.0.0.1]:25 delay=1.5s \
             status=deferred (timed out waiting for the relay (end of data); \
             the message may be delivered more than once)"
        );
        let before_the_dot = outcome::of_session_error(&SessionError::Timeout(Phase::Body)).outcome;
        assert_eq!(
            line(&before_the_dot),
            "0000ABCD tenant=acme to=<a@x.test> relay=relay.test[127.0.0.1]:25 delay=1.5s \
             status=deferred (timed out waiting for the relay (message body))"
        );
    }
}
