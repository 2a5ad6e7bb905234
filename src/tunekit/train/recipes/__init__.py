"""One readable file per task: each declares its row of the task table (`TASK`) and its recipe."""
