"""controlsite"""
