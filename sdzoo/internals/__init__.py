"""Private APIs of other libraries, one module per library, each listing what it uses and why."""
