Feature: Charging a booking
  The booking saga asks the payment service to charge a booking, and is told how it
  ended: the payment completed, or it failed and why. Each booking is charged at most
  once. Amounts are written in the currency's usual notation (125.00 EUR, 5000 JPY).

  Scenario: A processor that approves the charge completes the payment
    Given the payment processor approves every charge
    When the saga requests a payment of 125.00 EUR for booking "BK-1001"
    Then the saga is told the payment for booking "BK-1001" completed
    And the completed payment is for 125.00 EUR
    And booking "BK-1001" was charged exactly once

  Scenario: A processor that declines the charge fails the payment as declined
    Given the payment processor declines every charge
    When the saga requests a payment of 80.00 EUR for booking "BK-2001"
    Then the saga is told the payment for booking "BK-2001" failed because it was declined
    And the failure explains which decline the processor gave

  Scenario Outline: A random processor approves about the configured share of payments
    Given the payment processor decides at random with seed <seed> and success rate <rate>
    When the saga requests payments of 20.00 EUR for <count> new bookings
    Then every one of those bookings is told exactly one outcome
    And the share of completed payments is within <tolerance> of <rate>

    Examples:
      | seed | rate | count | tolerance |
      | 7    | 0.8  | 1000  | 0.05      |
      | 2026 | 0.3  | 1000  | 0.05      |

  Scenario: The same seed reproduces every outcome
    Given the payment processor decides at random with seed 42 and success rate 0.5
    And the saga has requested payments of 20.00 EUR for 200 new bookings
    When the service starts afresh with the same seed
    And the saga requests the same bookings again, in reverse order
    Then every booking ends exactly as it did the first time
    And some of those payments completed and some failed
