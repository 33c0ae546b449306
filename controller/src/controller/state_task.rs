//! The one task that owns the controller's [`State`]. Handlers, agent
//! sessions and the reconcile loop send it a command (a synchronous closure)
//! and await the closure's answer: the state is changed by this task alone,
//! one command at a time, in the order they were sent, and since a command
//! cannot await, nothing waits on the store, an agent or a timer while the
//! state is held. A command that changes a record enqueues its write on the
//! ordered [`crate::store::StoreWriter`] inside the closure (so the writes'
//! order is the changes' order) and returns the [`crate::store::Durable`];
//! the caller awaits it after the answer, off this task. A command once sent
//! runs even if its caller goes away meanwhile (a cancelled RPC): only
//! the answer is lost.
//!
//! A command that panics does not end the task: the panic is logged and
//! handed back to the caller, whose own task panics with it (as it did when
//! it held a lock); the state keeps whatever the command changed before it
//! panicked, as it did under that lock.

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::{Arc, Weak};

use tokio::sync::{mpsc, oneshot};

use super::{Controller, State};

/// A change or read of the state, run by the state task.
type StateCommand = Box<dyn FnOnce(&mut State, &Arc<Controller>) + Send>;

/// The sending side of the state task; dropping it (with its controller) ends the task.
pub(super) struct StateTask {
    commands: mpsc::UnboundedSender<StateCommand>,
}

impl StateTask {
    /// Starts the task that owns `state`. It holds its controller weakly
    /// (the controller holds this handle): a controller that is dropped
    /// (leadership lost) ends its task, and with it its store writer.
    pub(super) fn start(state: State, controller: Weak<Controller>) -> StateTask {
        let (commands, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(state, controller, rx));
        StateTask { commands }
    }

    /// Runs `f` on the state task and returns its answer. `f` gets the
    /// controller too, for its configuration, store writer and event senders.
    pub(super) async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut State, &Arc<Controller>) -> R + Send + 'static,
    ) -> R {
        let (reply, answer) = oneshot::channel();
        let command: StateCommand = Box::new(move |state, controller| {
            let result = catch_unwind(AssertUnwindSafe(|| f(state, controller)));
            if let Err(payload) = &result {
                tracing::error!(
                    panic = %panic_message(payload.as_ref()),
                    "a state command panicked; the state task goes on and the caller's task panics with it"
                );
            }
            let _ = reply.send(result);
        });
        if self.commands.send(command).is_err() {
            // Only a controller being dropped has no task; its callers are gone too.
            panic!("the controller's state task has ended (the controller is shutting down)");
        }
        match answer.await {
            Ok(Ok(value)) => value,
            Ok(Err(payload)) => resume_unwind(payload),
            Err(_) => panic!("the controller's state task ended before answering (the runtime is shutting down)"),
        }
    }
}

async fn run(mut state: State, controller: Weak<Controller>, mut commands: mpsc::UnboundedReceiver<StateCommand>) {
    while let Some(command) = commands.recv().await {
        let Some(controller) = controller.upgrade() else { break };
        command(&mut state, &controller);
    }
}

/// The text of a panic's payload (`panic!` with a literal or a format).
fn panic_message(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(not a string)")
}
