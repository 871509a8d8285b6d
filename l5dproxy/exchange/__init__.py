"""What the HTTP ends and the middle hand each other: messages, bodies, errors, contracts."""
