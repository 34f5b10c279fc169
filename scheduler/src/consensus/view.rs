//! The applied state as readers see it. The node loop publishes a new view
//! after each batch of applies; a reader clones the view's `Arc` and lets go
//! of the lock at once, so a read, however long, never holds up apply, and
//! apply never waits for a reader. Publishing is cheap because the state's
//! large parts are persistent maps (`coop_core::state::Jobs`, `imbl`): the
//! view shares them with the loop's state, which copies only what it changes
//! next.

use std::sync::{Arc, RwLock};

use coop_core::state::State;

/// The state after applying every entry up to `index`.
#[derive(Debug, Clone, Default)]
pub struct StateView {
    pub state: Arc<State>,
    pub index: u64,
}

/// Where the node loop publishes views and readers take them.
#[derive(Debug, Clone, Default)]
pub struct Views(Arc<RwLock<StateView>>);

impl Views {
    /// The latest view (the lock is held for two reference counts).
    pub fn current(&self) -> StateView {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the view readers get from now on; those holding the last one
    /// keep it as long as they like.
    pub fn publish(&self, state: &State, index: u64) {
        let view = StateView {
            state: Arc::new(state.clone()),
            index,
        };
        let old = std::mem::replace(
            &mut *self.0.write().unwrap_or_else(|e| e.into_inner()),
            view,
        );
        // Freed (when no reader holds it) after the lock is let go.
        drop(old);
    }
}
