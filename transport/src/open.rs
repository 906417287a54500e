//! Opening a provider. Each compiled-in provider contributes one [`Probe`]: whether it can run
//! on this host, and how to open a context on it. This is the one place that names the
//! providers; the objects in `api` only see the backend traits.
//!
//! Adding a provider: implement the traits of `backend` in a new module, give it a `PROBE`,
//! and list it in [`PROBES`] (behind its feature).

use crate::api::Context;
use crate::backend::Probe;
use crate::types::{OpenOptions, Provider};
use crate::{Error, Result};

/// Every provider built into this binary, in order of preference.
const PROBES: &[Probe] = &[
    #[cfg(feature = "verbs")]
    crate::verbs::PROBE,
    crate::tcp::PROBE,
];

/// Opens a device context on the chosen provider.
pub fn open(opts: &OpenOptions) -> Result<Context> {
    let probe =
        PROBES
            .iter()
            .find(|p| p.provider == opts.provider)
            .ok_or(Error::ProviderUnavailable(match opts.provider {
                Provider::Tcp => "tcp",
                Provider::Verbs => "verbs",
            }))?;
    Ok(Context::from_ops((probe.open)(opts)?))
}

/// The providers built into this binary, each with whether it can run on this host.
pub fn providers() -> Vec<(Provider, Result<()>)> {
    PROBES
        .iter()
        .map(|p| (p.provider, (p.available)()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_is_always_there_and_opens() {
        let all = providers();
        assert!(all.iter().any(|(p, r)| *p == Provider::Tcp && r.is_ok()));
        let ctx = open(&OpenOptions::new(Provider::Tcp)).unwrap();
        assert_eq!(ctx.provider(), Provider::Tcp);
    }

    #[cfg(not(feature = "verbs"))]
    #[test]
    fn a_provider_left_out_of_the_build_says_so() {
        assert!(matches!(
            open(&OpenOptions::new(Provider::Verbs)),
            Err(Error::ProviderUnavailable("verbs"))
        ));
    }
}
