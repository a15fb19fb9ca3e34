//! systemd over D-Bus: a unit's main process, and the proxies the actuators use to act on it.
//!
//! Property caching is off: a cached `MainPID` would hide a restart.

use zbus::{
    proxy::CacheProperties,
    zvariant::{OwnedObjectPath, Value},
    Connection,
};

use super::TargetError;

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1"
)]
pub(crate) trait Manager {
    fn get_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    fn load_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    fn restart_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn kill_unit(&self, name: &str, whom: &str, signal: i32) -> zbus::Result<()>;
    fn set_unit_properties(
        &self,
        name: &str,
        runtime: bool,
        properties: &[(&str, Value<'_>)],
    ) -> zbus::Result<()>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Service",
    default_service = "org.freedesktop.systemd1"
)]
pub(crate) trait Service {
    #[zbus(property, name = "MainPID")]
    fn main_pid(&self) -> zbus::Result<u32>;
    #[zbus(property, name = "MemoryMax")]
    fn memory_max(&self) -> zbus::Result<u64>;
    #[zbus(property, name = "CPUQuotaPerSecUSec")]
    fn cpu_quota_per_sec_usec(&self) -> zbus::Result<u64>;
}

/// Connects to `system`, `user` (the session bus) or an explicit D-Bus address.
pub(crate) async fn connect(bus: &str) -> zbus::Result<Connection> {
    match bus {
        "system" => Connection::system().await,
        "user" => Connection::session().await,
        address => zbus::connection::Builder::address(address)?.build().await,
    }
}

pub(super) async fn main_pid(unit: &str, bus: &str) -> Result<u32, TargetError> {
    let err = |source: zbus::Error| TargetError::Systemd {
        unit: unit.to_owned(),
        source: Box::new(source),
    };
    let connection = connect(bus).await.map_err(err)?;
    let manager = ManagerProxy::new(&connection).await.map_err(err)?;
    let path = match manager.get_unit(unit).await {
        Ok(path) => path,
        // A unit that is not loaded has never run (or was garbage-collected after stopping).
        Err(zbus::Error::MethodError(name, _, _))
            if name.as_str() == "org.freedesktop.systemd1.NoSuchUnit" =>
        {
            return Err(TargetError::UnitNotRunning {
                unit: unit.to_owned(),
            })
        }
        Err(source) => return Err(err(source)),
    };
    let service = ServiceProxy::builder(&connection)
        .path(path)
        .map_err(err)?
        .cache_properties(CacheProperties::No)
        .build()
        .await
        .map_err(err)?;
    match service.main_pid().await.map_err(err)? {
        0 => Err(TargetError::UnitNotRunning {
            unit: unit.to_owned(),
        }),
        pid => Ok(pid),
    }
}
