"""Deployment of trained models into other MD engines (LAMMPS: `polarmace.deploy.lammps`)."""
