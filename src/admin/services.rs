//! [`Services`]: the named balancers an admin server shows and steers.

use std::sync::{Arc, RwLock};

use super::AdminError;
use crate::BalancerHandle;

/// The longest service name.
pub const MAX_SERVICE_NAME_LEN: usize = 64;

/// The services an [`AdminServer`](super::AdminServer) shows and steers, by name, in the order they
/// were added. Cheap to clone: every clone is the same registry, so services may be added or removed
/// while the server runs (a configuration reload does that).
///
/// ```
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use ulb_tcp::admin::Services;
/// use ulb_tcp::{BackendConfig, BalancerConfig, TcpBalancer};
///
/// let balancer = TcpBalancer::new(BalancerConfig::new([BackendConfig::new("127.0.0.1:8081".parse()?)]))?;
/// let services = Services::new();
/// services.insert("web", balancer.handle())?;
/// assert!(services.insert("web", balancer.handle()).is_err()); // one service per name
/// assert_eq!(services.names(), ["web"]);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default)]
pub struct Services {
    inner: Arc<RwLock<Vec<(String, BalancerHandle)>>>,
}

impl Services {
    /// No services yet.
    pub fn new() -> Self {
        Services::default()
    }

    /// One service, `name`.
    pub fn single(name: &str, handle: BalancerHandle) -> Result<Self, AdminError> {
        let s = Services::new();
        s.insert(name, handle)?;
        Ok(s)
    }

    /// Adds a service. Its name is 1 to 64 characters among letters, digits, `-`, `_` and `.` (it goes
    /// in URLs unencoded), and unique.
    pub fn insert(&self, name: &str, handle: BalancerHandle) -> Result<(), AdminError> {
        check_name(name)?;
        let mut all = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if all.iter().any(|(n, _)| n == name) {
            return Err(AdminError::DuplicateService(name.to_string()));
        }
        all.push((name.to_string(), handle));
        Ok(())
    }

    /// Whether `name` may name a service: 1 to 64 characters among letters, digits, `-`, `_` and `.`.
    pub fn check_name(name: &str) -> Result<(), AdminError> {
        check_name(name)
    }

    /// Puts `handle` in the place of the service `name` (a reload that rebuilt it), keeping its
    /// position; adds it if there is none. Its previous handle, if there was one.
    pub fn replace(
        &self,
        name: &str,
        handle: BalancerHandle,
    ) -> Result<Option<BalancerHandle>, AdminError> {
        check_name(name)?;
        let mut all = self.inner.write().unwrap_or_else(|p| p.into_inner());
        match all.iter_mut().find(|(n, _)| n == name) {
            Some((_, h)) => Ok(Some(std::mem::replace(h, handle))),
            None => {
                all.push((name.to_string(), handle));
                Ok(None)
            }
        }
    }

    /// Removes the service `name`; its handle, if there was one.
    pub fn remove(&self, name: &str) -> Option<BalancerHandle> {
        let mut all = self.inner.write().unwrap_or_else(|p| p.into_inner());
        let i = all.iter().position(|(n, _)| n == name)?;
        Some(all.remove(i).1)
    }

    /// The handle of the service `name`.
    pub fn get(&self, name: &str) -> Option<BalancerHandle> {
        let all = self.inner.read().unwrap_or_else(|p| p.into_inner());
        all.iter().find(|(n, _)| n == name).map(|(_, h)| h.clone())
    }

    /// The names, in the order the services were added.
    pub fn names(&self) -> Vec<String> {
        let all = self.inner.read().unwrap_or_else(|p| p.into_inner());
        all.iter().map(|(n, _)| n.clone()).collect()
    }

    /// Every service, name and handle, in order.
    pub fn all(&self) -> Vec<(String, BalancerHandle)> {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// How many services there are.
    pub fn len(&self) -> usize {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn check_name(name: &str) -> Result<(), AdminError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_SERVICE_NAME_LEN
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && name != "."
        && name != "..";
    if ok {
        Ok(())
    } else {
        Err(AdminError::BadServiceName(name.escape_debug().to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names() {
        for good in [
            "default",
            "web",
            "a",
            "redis-6379",
            "a.b_c",
            &"x".repeat(64),
        ] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "a b", "a/b", "é", "..", ".", &"x".repeat(65), "a\nb"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
