"""What an agent knows about its machine: devices, power, speed, attestation."""
