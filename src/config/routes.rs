//! The lookups that run per message and per command, built once at load: a
//! tenant by name, and the tenant claiming a sender domain, each a hash-map
//! probe (a wildcard one per label of the domain), so their cost does not
//! grow with the number of tenants configured.

use std::collections::HashMap;

use super::tenant::{DomainPattern, TenantConfig};
use crate::base::names::TenantName;

/// Positions in `Config::tenants`, which is not changed after load.
#[derive(Debug, Clone, Default)]
pub(super) struct Routes {
    by_name: HashMap<TenantName, usize>,
    /// Exact domains, lowercase.
    exact: HashMap<String, usize>,
    /// `*.suffix` claims, keyed by the suffix.
    wildcard: HashMap<String, usize>,
}

impl Routes {
    /// Indexes valid tenants; names and domain claims are unique by then
    /// (validation refused duplicates), else the first one wins, as a scan would.
    pub(super) fn new(tenants: &[TenantConfig]) -> Routes {
        let mut routes = Routes::default();
        for (i, tenant) in tenants.iter().enumerate() {
            routes.by_name.entry(tenant.name.clone()).or_insert(i);
            for domain in &tenant.domains {
                let (map, key) = match domain {
                    DomainPattern::Exact(d) => (&mut routes.exact, d),
                    DomainPattern::Wildcard(suffix) => (&mut routes.wildcard, suffix),
                };
                map.entry(key.clone()).or_insert(i);
            }
        }
        routes
    }

    pub(super) fn by_name(&self, name: &TenantName) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    /// `domain` is lowercase and without a trailing dot. An exact claim wins;
    /// else the longest `*.suffix` that leaves at least one label in front
    /// (`*.acme.example` claims `a.acme.example`, not `acme.example`).
    pub(super) fn by_domain(&self, domain: &str) -> Option<usize> {
        if let Some(&i) = self.exact.get(domain) {
            return Some(i);
        }
        // Suffixes after each dot, longest first; a dot at the very start
        // would leave no label in front, so it starts no candidate.
        domain
            .match_indices('.')
            .filter(|(at, _)| *at > 0)
            .find_map(|(at, _)| domain.get(at + 1..).and_then(|s| self.wildcard.get(s)))
            .copied()
    }
}
