//! Windows: the forwarder as a Windows service (the `windows-service` crate).
//!
//! `hostnet-forwarder service install [--name N] -- RUN-ARGS...` checks `RUN-ARGS` as `run`
//! would, registers an auto-start service (LocalSystem) whose command line is
//! `"<this exe>" service run --name N -- RUN-ARGS...`, sets it to restart after a failure, and
//! starts it. The service manager runs that command: [`ServiceAction::Run`] hands the process to
//! the service dispatcher, reports `Running`, runs the forwarder until the manager asks it to
//! stop (or the system shuts down), then reports `Stopped` with the exit code. With no
//! `--log-file` in `RUN-ARGS` the log goes to `%ProgramData%\hostnet\forwarder.log` (a service
//! has no console). `service uninstall [--name N]` stops and deletes it.
//!
//! A service rather than a logon task: it starts before anyone logs on and is restarted by the
//! manager after a crash, it is listed and controlled like every other background service
//! (`sc query`, `services.msc`, `Get-Service`), and loopback listeners are shared by every
//! session, so a service in session 0 serves every user's `localhost`. What it cannot do is
//! follow one user's WSL2 VM, whose id changes each time WSL starts: for WSL2 prefer `tcp://` to
//! a fixed address, or reinstall with the new id (README).

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Parser as _;
use tokio_util::sync::CancellationToken;
use windows_service::service::{
    ServiceAccess, ServiceAction as ScAction, ServiceActionType, ServiceControl,
    ServiceControlAccept, ServiceErrorControl, ServiceExitCode, ServiceFailureActions,
    ServiceFailureResetPeriod, ServiceInfo, ServiceStartType, ServiceState, ServiceStatus,
    ServiceType,
};
use windows_service::service_control_handler::{self, ServiceControlHandlerResult};
use windows_service::service_manager::{ServiceManager, ServiceManagerAccess};
use windows_service::{define_windows_service, service_dispatcher};

use super::ServiceAction;
use crate::cli::{Cli, Command, RunArgs};

const SERVICE_TYPE: ServiceType = ServiceType::OWN_PROCESS;

/// What `service run` parsed, for the service's main function (which the dispatcher calls on
/// its own thread, without arguments of ours).
static PENDING: Mutex<Option<(String, RunArgs)>> = Mutex::new(None);

pub(super) fn dispatch(action: ServiceAction) -> anyhow::Result<i32> {
    match action {
        ServiceAction::Install { name, run_args } => install(&name, run_args),
        ServiceAction::Uninstall { name } => uninstall(&name),
        ServiceAction::Run { name, run_args } => {
            let args = parse_run_args(&run_args)?;
            *PENDING.lock().unwrap_or_else(|e| e.into_inner()) = Some((name.clone(), args));
            service_dispatcher::start(&name, ffi_service_main).with_context(|| {
                format!(
                    "cannot start the service dispatcher for {name:?} (this command is what \
                     the service manager runs; use `hostnet-forwarder run` interactively)"
                )
            })?;
            Ok(0)
        }
    }
}

/// `RUN-ARGS` as `hostnet-forwarder run RUN-ARGS...` would take them.
fn parse_run_args(run_args: &[String]) -> anyhow::Result<RunArgs> {
    let argv = ["hostnet-forwarder", "run"]
        .into_iter()
        .map(String::from)
        .chain(run_args.iter().cloned());
    match Cli::try_parse_from(argv) {
        Ok(Cli {
            command: Command::Run(a),
        }) => Ok(a),
        Ok(_) => bail!("not `run` arguments"),
        Err(e) => bail!("the service's `run` arguments: {e}"),
    }
}

fn install(name: &str, run_args: Vec<String>) -> anyhow::Result<i32> {
    let log = parse_run_args(&run_args)?
        .common
        .log_file
        .unwrap_or_else(default_log_file);
    let exe = std::env::current_exe().context("cannot find this executable's path")?;
    let mut launch: Vec<OsString> = ["service", "run", "--name", name, "--"]
        .iter()
        .map(OsString::from)
        .collect();
    launch.extend(run_args.iter().map(OsString::from));
    let manager = ServiceManager::local_computer(
        None::<&str>,
        ServiceManagerAccess::CONNECT | ServiceManagerAccess::CREATE_SERVICE,
    )
    .context("cannot open the service manager (run as administrator)")?;
    let info = ServiceInfo {
        name: name.into(),
        display_name: "hostnet forwarder".into(),
        service_type: SERVICE_TYPE,
        start_type: ServiceStartType::AutoStart,
        error_control: ServiceErrorControl::Normal,
        executable_path: exe.clone(),
        launch_arguments: launch,
        dependencies: vec![],
        account_name: None,
        account_password: None,
    };
    let service = manager
        .create_service(
            &info,
            ServiceAccess::CHANGE_CONFIG | ServiceAccess::START | ServiceAccess::QUERY_STATUS,
        )
        .with_context(|| format!("cannot create the service {name:?}"))?;
    service
        .set_description(
            "Mirrors a Linux VM's listening ports onto this host's loopback, and this host's \
             listeners into the VM (hostnet).",
        )
        .context("cannot set the service description")?;
    let restart = ScAction {
        action_type: ServiceActionType::Restart,
        delay: Duration::from_secs(2),
    };
    if let Err(e) = service.update_failure_actions(ServiceFailureActions {
        reset_period: ServiceFailureResetPeriod::After(Duration::from_secs(600)),
        reboot_msg: None,
        command: None,
        actions: Some(vec![restart.clone(), restart.clone(), restart]),
    }) {
        eprintln!("hostnet-forwarder: the service will not be restarted after a failure: {e}");
    }
    service
        .start::<&str>(&[])
        .with_context(|| format!("the service {name:?} is installed but did not start"))?;
    println!(
        "installed and started the service {name:?}: {}",
        exe.display()
    );
    println!("status: hostnet-forwarder status (log: {})", log.display());
    Ok(0)
}

fn uninstall(name: &str) -> anyhow::Result<i32> {
    let manager = ServiceManager::local_computer(None::<&str>, ServiceManagerAccess::CONNECT)
        .context("cannot open the service manager (run as administrator)")?;
    let service = manager
        .open_service(
            name,
            ServiceAccess::QUERY_STATUS | ServiceAccess::STOP | ServiceAccess::DELETE,
        )
        .with_context(|| format!("no service {name:?}"))?;
    service
        .delete()
        .with_context(|| format!("cannot delete the service {name:?}"))?;
    if service.query_status()?.current_state != ServiceState::Stopped {
        service
            .stop()
            .with_context(|| format!("cannot stop the service {name:?}"))?;
    }
    println!("removed the service {name:?}");
    Ok(0)
}

/// `%ProgramData%\hostnet\forwarder.log`.
fn default_log_file() -> PathBuf {
    let base = std::env::var_os("ProgramData").unwrap_or_else(|| r"C:\ProgramData".into());
    PathBuf::from(base).join("hostnet").join("forwarder.log")
}

define_windows_service!(ffi_service_main, service_main);

fn service_main(_arguments: Vec<OsString>) {
    let Some((name, mut args)) = PENDING.lock().unwrap_or_else(|e| e.into_inner()).take() else {
        return;
    };
    if args.common.log_file.is_none() {
        let file = default_log_file();
        if let Some(dir) = file.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        args.common.log_file = Some(file);
    }
    if let Err(e) = crate::cli::init_logs(args.common.log_format, args.common.log_file.as_deref()) {
        eprintln!("hostnet-forwarder: {e:#}");
    }
    if let Err(e) = run_service(&name, args) {
        tracing::error!(error = format!("{e:#}"), "the service failed");
    }
}

fn run_service(name: &str, args: RunArgs) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let on_control = {
        let stop = stop.clone();
        move |control| match control {
            ServiceControl::Stop | ServiceControl::Shutdown | ServiceControl::Preshutdown => {
                stop.cancel();
                ServiceControlHandlerResult::NoError
            }
            ServiceControl::Interrogate => ServiceControlHandlerResult::NoError,
            _ => ServiceControlHandlerResult::NotImplemented,
        }
    };
    let status = service_control_handler::register(name, on_control)
        .context("cannot register the service control handler")?;
    let report = |state, exit: u32| {
        status.set_service_status(ServiceStatus {
            service_type: SERVICE_TYPE,
            current_state: state,
            controls_accepted: if state == ServiceState::Running {
                ServiceControlAccept::STOP | ServiceControlAccept::SHUTDOWN
            } else {
                ServiceControlAccept::empty()
            },
            exit_code: ServiceExitCode::Win32(exit),
            checkpoint: 0,
            wait_hint: Duration::from_secs(5),
            process_id: None,
        })
    };
    report(ServiceState::Running, 0).context("cannot report Running")?;
    tracing::info!(service = name, "running as a Windows service");
    let threads = args.common.threads;
    let result = crate::cli::runtime_with(threads).and_then(|rt| {
        rt.block_on(crate::cli::serve(args, async move {
            stop.cancelled().await;
            "service stop"
        }))
    });
    if let Err(e) = &result {
        tracing::error!(error = format!("{e:#}"), "the forwarder failed");
    }
    report(ServiceState::Stopped, u32::from(result.is_err())).context("cannot report Stopped")?;
    result
}
